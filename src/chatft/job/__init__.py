"""A training job as ``chatft train`` runs it: prepare the data, train, export, ask.

* :mod:`~chatft.job.launch`: the parent process (data summary, ``--plan auto``, then training in
  this process or DeepSpeed's launcher);
* :mod:`~chatft.job.worker`: one process started by that launcher;
* :mod:`~chatft.job.run`: what every training process does, train -> export -> ask.
"""
