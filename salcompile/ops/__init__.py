"""Custom ops (torch.library) whose autograd formulas carry the feedback rules.

Importing this package registers them; `import salcompile` does so, which is what a reloaded
export archive needs to run (and to keep training with FA, not backprop).
"""
from . import dfa, fa, gate, areas, finite, compact, autocast  # noqa: F401  (registration side effects)
from . import fast

fast.register_all()   # the eager fast path (salcompile/ops/fast.py) for every op above
