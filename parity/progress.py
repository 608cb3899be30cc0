"""A progress bar over a parity run's loads and forward calls: tqdm when it is importable, else nothing."""
import sys


class Progress:

    def __init__(self, total: int, enabled: bool = True):
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc='parity', unit='step', file=sys.stderr, leave=False,
                             dynamic_ncols=True)

    def stage(self, text: str):
        if self._bar is not None:
            self._bar.set_description(f'parity: {text}')

    def update(self, n: int = 1):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __bool__(self):  # lets the runners write `if progress:`
        return True
