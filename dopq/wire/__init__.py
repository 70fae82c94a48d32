"""What the client and the server share, and nothing else they need.

``protocol``  serializer, name-server prefix, the token annotation, the error
              classes registered with Pyro5, the calls that may be retried
``views``     the shapes of what the API returns (TypedDicts) and how times travel
``tls``       certificates, fingerprints, pinned connections
``transport`` the guarded Pyro5 transport the server's daemons run on

Imports only ``dopq.core`` (and Pyro5); ``dopq.client`` and ``dopq.server`` both
import it and never each other.
"""
