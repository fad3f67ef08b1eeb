"""Runs at start of every Python process of a peer benchmark run (this folder is on
``PYTHONPATH`` for those runs only): installs the step recorder of ``peer_measure.py``, then
runs the ``sitecustomize`` this one shadows, if the interpreter has one further down the path.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _here)
try:
    import peer_measure

    peer_measure.install()
finally:
    sys.path.remove(_here)

for _entry in sys.path:
    _other = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.abspath(os.path.dirname(_other)) != _here and os.path.isfile(_other):
        with open(_other) as _f:
            exec(compile(_f.read(), _other, "exec"), {"__name__": "sitecustomize",
                                                      "__file__": _other})
        break
