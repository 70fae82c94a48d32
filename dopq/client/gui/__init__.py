"""DoPQ's desktop client (PySide6): a live window onto the queue.

Structure, one way only (each module imports only those above it)::

    compat.py      emit(): a work-around for a PySide6 reference-count bug.
    columns.py     the columns of each view and how values are written.
    models.py      RowModel (QAbstractTableModel) per view: rows keyed by id,
                   updated in place by diff; FilterProxy in front of each.
                   No widget code; state colours come in as a dict.
    viewthread.py  ViewThread (QThread) polls ``snapshot()`` and emits one
                   signal per view, plus connected / disconnected /
                   unauthenticated; Runner + Task run commands on a thread
                   pool and call back on the GUI thread.
    style.py       StyleManager applies a .qss file and reloads it on change;
                   StateColors, a hidden widget whose Qt properties the sheet
                   sets (``StateColors { qproperty-failed: #e53935; }``).
    styles/        dark.qss (default) and light.qss.
    widgets.py     TablePanel (filter box + table), the System summary.
    dialogs.py     job details with live logs, Update enqueued containers,
                   sign-in, submit, and the message-box helpers.
    pipeline.py    Pipeline (QMainWindow): five QDockWidgets, the Commands
                   menu and toolbar, connection state in the status bar.
    app.py         ``main(args)`` for ``dopq gui`` (and ``--screenshot``).

The window talks to the server only through ``dopq.client.remote.Client`` (any
object with its interface will do), never on the GUI thread.
"""
