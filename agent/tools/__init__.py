"""Tools that drive the agent from outside: camera-sim (a simulated line camera), demo (camera-sim
+ agent + subscriber on loopback) and bench (end-to-end speed against bare model throughput).

They use the service and the model packs like any other client; the service never imports them.
May import: ``agent``, ``engines``, ``training`` (synthetic strips and dataset readers, numpy only),
``metrics``.
"""
