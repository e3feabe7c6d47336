"""A fleet of dreamstream servers on Ray Serve: one replica per device behind one URL.

Each replica is the single server's FastAPI app (:func:`server.app.create_app`) with its own
device worker and session map. Modules, one concept each:

* :mod:`server.fleet.view` — what the app asks of its fleet (torch- and Ray-free);
* :mod:`server.fleet.routing` — the request router: a connection naming a session
  (``protocol.routing``) goes to the replica that holds it, a new one to the least loaded
  replica with a free session slot;
* :mod:`server.fleet.registry` — a small deployment where replicas report their state (the
  fleet's ``/readyz``, ``/v1/info`` and ``/metrics``);
* :mod:`server.fleet.replica` — the replica deployment (reporting, routing stats, drain on
  scale-down, health);
* :mod:`server.fleet.deploy` — deployment options and the application builder of ``serve run`` /
  ``serve deploy`` (``server.fleet.deploy:build``);
* :mod:`server.fleet.run` — ``dreamstream serve --ray``.

Only ``view`` may be imported without Ray installed (the ``ray`` extra).
"""
