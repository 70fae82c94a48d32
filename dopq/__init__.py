"""DoPQ, the Docker Priority Queue.

Layers, imported one way only:
    core (errors, settings, jobs, spec, archive, policy, gpus)
      <- store / runtime / provider
      <- server (queue thread, DataPlatform)
      <- api (Pyro5 Controller)
      <- client <- cli / gui
"""

__version__ = "2.0.0"
