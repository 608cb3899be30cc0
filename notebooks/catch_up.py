"""Catch up: write the files that earlier notebooks write, for a reader who opens a later notebook first.

Each notebook of the guided port writes pieces of your port into `my_port/` with `%%writefile` cells. A notebook
that builds on earlier ones calls `catch_up('03_prepare_inputs')`, which replays, in order, the `%%writefile`
cells of every notebook numbered before it (the last version of each file wins), writing only files that do not
exist yet: what you wrote yourself is never touched. It also builds the tiny Gemma checkpoint the notebooks use.
"""
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = os.path.join(HERE, 'my_port')
CHECKPOINT = os.path.join(PORT, 'tiny-gemma')


def _writefile_cells(notebook: str) -> list[tuple]:
    """(path, text, append) for each %%writefile cell of a notebook, in order."""
    with open(notebook, encoding='utf-8') as f:
        cells = json.load(f)['cells']
    found = []
    for cell in cells:
        source = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
        if cell['cell_type'] != 'code' or not source.startswith('%%writefile'):
            continue
        header, _, body = source.partition('\n')
        args = header.split()[1:]
        append = '-a' in args
        path = [a for a in args if not a.startswith('-')][0]
        found.append((path, body if body.endswith('\n') else body + '\n', append))
    return found


def catch_up(notebook: str) -> list[str]:
    """Write what the notebooks numbered before `notebook` ('03_prepare_inputs' or '03') would have written."""
    number = notebook.split('_')[0]
    files: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(HERE, '[0-9][0-9]_*.ipynb'))):
        if os.path.basename(path).split('_')[0] >= number:
            break
        for target, text, append in _writefile_cells(path):
            files[target] = files.get(target, '') + text if append else text
    os.makedirs(PORT, exist_ok=True)
    written = []
    for target, text in files.items():
        full = os.path.join(HERE, target)
        if not os.path.exists(full):
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, 'w', encoding='utf-8') as f:
                f.write(text)
            written.append(target)
    if not os.path.isfile(os.path.join(CHECKPOINT, 'config.json')):
        from lmdp.tiny import make_tiny
        make_tiny('gemma', CHECKPOINT)
        written.append(os.path.relpath(CHECKPOINT, HERE))
    print('caught up: wrote ' + ', '.join(written) if written else 'nothing to catch up: my_port/ is complete')
    return written
