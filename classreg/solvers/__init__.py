"""The solvers. Each module exposes one public ``register_*`` function returning a :class:`classreg.Result`."""
