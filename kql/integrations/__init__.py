"""Drop-in occlusion for Captum and MONAI users, computed by KQL's engine.

* :class:`kql.integrations.captum.Occlusion`: ``captum.attr.Occlusion``'s constructor,
  ``attribute`` signature and returned tensor.
* :class:`kql.integrations.monai.OcclusionSensitivity`:
  ``monai.visualize.OcclusionSensitivity``'s constructor, call and outputs (2D images).

Neither library is needed to use them: each reproduces its library's windows, fills and
averaging, and hands the occlusion scans to KQL's planner and operators
(:mod:`.scan`), so the maps are the libraries' (tested against them) at KQL's speed.
"""
