"""Every private or version-dependent internal of another library that this package touches, in one place.

The rest of the package reaches transformers, trl, peft, accelerate, bitsandbytes and torch through their public
APIs only. Where no public API does the job, the touch lives here, named for what it does, and
tests/test_compat.py checks each one against the installed release: when a library changes the internal, that test
fails with a message naming it, instead of the package going silently wrong.

Imports of the training stack (Trainer, trl, peft, accelerate) happen inside the functions that need them, so that
importing the model imports none of it.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------------------
# Model side (transformers modeling / generation / cache, torch kernels)


# ---------------------------------------------------------------------------------------------------------------------
# Training side (Trainer, trl, peft, accelerate, bitsandbytes): used by trainers/ and quant/ only
