"""Experiments built on the library: they train and evaluate configurations and write results
and figures.  Nothing in the core imports them.

* :mod:`.compare` — one network, schedule and budget, several training objectives and seeds
  (``pyro-diffusion compare``, ``examples/digits_compare.py``).
* :mod:`.schedule_study` — fixed against learned noise schedules, discrete against
  continuous time, on a K-level data set (``pyro-diffusion compare --vdm``,
  ``examples/learned_schedule_digits.py``).
"""

__all__ = ["compare", "schedule_study"]
