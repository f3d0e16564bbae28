"""Physical operators: the ways KQL computes an occlusion heat map.

Every operator answers the same question (an :class:`~kql.operators.task.OcclusionTask`)
and must agree with :class:`~kql.operators.naive.NaiveOcclusion`, the plain baseline.
This layer never imports ``kql`` itself, the planner or the shell.
"""
