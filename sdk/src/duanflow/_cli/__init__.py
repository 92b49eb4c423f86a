"""The ``duanflow`` command line: ``dev`` (the local stack), ``deploy`` and ``run``."""
