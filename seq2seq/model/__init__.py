"""The model: ``encoder``, ``attention``, ``decoder``, ``network`` (Seq2Seq and its builder) and
``losses`` are the reference model, plain torch on any device. ``engine`` chooses what runs it
(``trainer.kernels``): the reference modules, or ``fast``, the CPU kernels bound to the same
parameters. ``devices`` resolves the device and precision keys. Imports ``core``, ``kernels``
(``fast`` and ``devices`` only) and ``data``."""
