"""labsupport: the tested code behind the labs of "Federated Learning and Edge Distributed Systems".

One package serves every chapter (as d2l's ``d2l`` package does): the notebooks explain, plot and call
it; the implementation lives here once.

* :mod:`labsupport.data` -- datasets (MNIST-1D generated offline, digits, torchvision sets).
* :mod:`labsupport.partitions` -- federated partitions (IID, Dirichlet, shards, quantity/feature skew).
* :mod:`labsupport.models` -- logistic regression, MLP, 1-D and 2-D CNNs.
* :mod:`labsupport.train` -- centralized training/evaluation loops.
* :mod:`labsupport.device` -- CUDA/MPS/CPU, Jetson, TensorRT; CPU thread settings.
* :mod:`labsupport.fl` -- federated learning (chapter 01).
* :mod:`labsupport.bench` -- ``python -m labsupport.bench``: benchmarks as side-by-side ratios.
* :mod:`labsupport.notebook` -- smoke mode and figure saving for the notebooks.
"""

__version__ = "0.1.0"
