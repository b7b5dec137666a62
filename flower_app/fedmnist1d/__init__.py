"""fedmnist1d: chapter 01's FedAvg on MNIST-1D as a Flower app (Message API, Flower 1.42).

The same task as :class:`labsupport.fl.FedAvgSimulation`, in the layout of Flower's examples:

* :mod:`fedmnist1d.task` -- the run configuration (:class:`~fedmnist1d.task.AppConfig`, the one place
  the defaults live), the data and partitions, the model; all of it calls :mod:`labsupport`.
* :mod:`fedmnist1d.client_app` -- the ``ClientApp``: ``@app.train()`` runs
  :func:`labsupport.fl.fedavg.local_update`, ``@app.evaluate()`` tests on the node's test partition.
* :mod:`fedmnist1d.server_app` -- the ``ServerApp``: Flower's ``FedAvg`` strategy with a central
  evaluation on the MNIST-1D test set, writing the history and final model to ``results-file``.
"""
