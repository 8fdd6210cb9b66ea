"""The policy study: does the GMPQ search beat chance at equal BitOPs?

A study trains FP teachers, runs the searches, writes uniform and random
policies at each budget, finetunes every policy with each seed and reports
the gaps. The modules, bottom up:

* :mod:`.presets` -- the presets (plain data);
* :mod:`.plan` -- which runs, in dependency order (plain Python);
* :mod:`.report` -- ``study.md`` / ``study.png`` from finished runs (numpy);
* :mod:`.results` -- each run's ``result.json``;
* :mod:`.data`, :mod:`.configs`, :mod:`.policies`, :mod:`.runs` -- the
  data, configs, fixed policies and runs (mmengine / mmpretrain: floor 2);
* :mod:`.runner` -- a process pool over the plan, resumable;
* :mod:`.diagnostics` -- one search watched from the inside.

Importing this package imports nothing heavy; ``tools/analysis/
policy_study.py`` and ``search_diagnostics.py`` are command lines over it.
"""
