"""``python -m memprof_limits_repl``: the same as ``memprof-limits``."""

from memprof_limits_repl import main

raise SystemExit(main())
