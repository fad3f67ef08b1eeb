"""The memory planner: will a training job fit a machine, and which strategy is fastest that does.

* :mod:`~chatft.train.plan.shape`: a model's parameters from its config;
* :mod:`~chatft.train.plan.job`: the inputs (job, strategy, calibration, speed rates);
* :mod:`~chatft.train.plan.cost`: the cost model, pure arithmetic (peak GPU and host memory,
  step time) of a :class:`~chatft.train.plan.cost.Job` run as a
  :class:`~chatft.train.plan.cost.Strategy`;
* :mod:`~chatft.train.plan.report`: candidates, ranking, the recommendation, table and JSON;
* :mod:`~chatft.train.plan.hardware`: this machine's GPUs and host memory;
* :mod:`~chatft.train.plan.apply`: chatft's config to a Job, ``chatft plan``, ``--plan auto``,
  and the out-of-memory advice.
"""
