"""Model backends behind one Protocol (see :mod:`omni_ros.backends.base`)."""
