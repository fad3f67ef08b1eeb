"""chatft: full-parameter fine-tuning of chat models on your own dialogues."""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# transformers imports torchao (the optional low-bit optimizers, `chatft[lean]`) whenever it is
# installed. torchao's compiled extensions are built for one torch version and chatft uses none
# of them: skip loading them (into another torch they only fail with warnings), and keep the
# lines torchao and torch log about it (a skipped extension, a deprecated pytree registration)
# out of chatft's output.
_os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")


class _DropNoise(_logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: _logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_logging.getLogger("torchao").addFilter(_DropNoise("cpp extensions"))
_logging.getLogger("torch.utils._pytree").addFilter(_DropNoise("register_constant()"))
