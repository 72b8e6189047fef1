"""The last of the runner's preloads (simulations.deploy.runner.PRELOAD): it freezes what the others made.

Importing it calls `gc.freeze()`, as Python advises for a process that forks without exec: the hundreds of
thousands of objects torch and Flower leave behind move to the permanent generation, so the garbage collector
of a task forked from the task server never walks them (a full collection of them cost about 0.2-0.4 s here)
nor writes to their pages, which would copy them into every task. Only the task server imports it.
"""

import gc

gc.freeze()
