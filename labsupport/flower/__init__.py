"""Flower (flwr 1.42) for the course: the chapter 01 app run from Python, on processes, and securely.

* :mod:`~labsupport.flower.simulation` -- ``flower_app/`` in Flower's Simulation Engine (Ray), from a
  notebook: :func:`~labsupport.flower.simulation.run_flower_simulation`.
* :mod:`~labsupport.flower.deployment` -- the Deployment Engine on loopback: a SuperLink and N
  SuperNodes as real processes, insecure or with TLS and SuperNode authentication
  (:class:`~labsupport.flower.deployment.LocalDeployment`, ``python -m labsupport.flower.deployment``).
* :mod:`~labsupport.flower.bridge` -- any :class:`labsupport.fl.aggregators.Aggregator` as a Flower
  strategy, and the registry behind the app's ``aggregator`` knob.
* :mod:`~labsupport.flower.certs` -- a throwaway CA, a SuperLink certificate and SuperNode key pairs,
  made with the ``cryptography`` package.
* :mod:`~labsupport.flower.processes` -- starting, watching and stopping process groups, offline.

Every module but ``certs`` and ``processes`` imports Flower, so nothing is re-exported here: import
from the modules.
"""
