"""fedmnist1d: chapter 01's FedAvg on MNIST-1D as a Flower app (Message API, Flower 1.42).

The same task as :class:`labsupport.fl.server.FedAvgSimulation`, in the layout of Flower's examples:

* :mod:`fedmnist1d.task` -- the run configuration (:class:`~fedmnist1d.task.AppConfig`, the one place
  the defaults live), the data and partitions, the model; all of it calls :mod:`labsupport`.
* :mod:`fedmnist1d.client_app` -- the ``ClientApp``: ``@app.train()`` runs
  :func:`labsupport.fl.clients.local_update`, ``@app.evaluate()`` tests on the node's test partition.
* :mod:`fedmnist1d.server_app` -- the ``ServerApp``: Flower's ``FedAvg`` sampling and evaluation with
  the aggregation of a labsupport ``Aggregator`` (:mod:`labsupport.flower.bridge`, the ``aggregator``
  knob), a central evaluation on the MNIST-1D test set, the history and final model to ``results-file``.
"""
