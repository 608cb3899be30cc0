"""JupyterLab in headless Chromium, as a person would use it: open notebooks/00_tour.ipynb, Run All Cells from the
Run menu, wait for the per-layer view to render, check that its table has one row per tap, save a screenshot.

The screenshot lands in artifacts/browser/ at the repository root (CI keeps it as an artifact). Chromium comes
from Debian (`apt-get install chromium chromium-driver`), driven through selenium with Debian's chromedriver.
Locally the test skips when any of them is missing; under CI (CI set) a missing piece fails it instead.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(REPO, 'artifacts', 'browser')
SCREENSHOT = os.path.join(ARTIFACTS, '00_tour.png')
VIEW_SCREENSHOT = os.path.join(ARTIFACTS, '00_tour_per_layer_view.png')
TOKEN = 'lmdp-browser-test'
STALL_S = 180       # no cell finished for this long: the run is stuck (one cell takes ~5 s alone, ~30 s on a busy CI)
RUN_LIMIT_S = 900   # the whole run, however steady its progress


def _missing(what: str):
    message = f'browser test: {what}'
    if os.environ.get('CI'):
        pytest.fail(message)
    pytest.skip(message)


def _tool(names, package: str) -> str:
    for name in names:
        found = shutil.which(name) or (os.path.exists(f'/usr/bin/{name}') and f'/usr/bin/{name}')
        if found:
            return found
    _missing(f'no {names[0]} (apt-get install -y {package})')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _user_settings(settings_dir: str):
    """Keep every cell in the DOM (no windowed rendering) and keep news and update checks quiet."""
    for plugin, values in {'@jupyterlab/notebook-extension/tracker': {'windowingMode': 'none'},
                           '@jupyterlab/apputils-extension/notification': {'fetchNews': 'false',
                                                                           'checkForUpdates': False}}.items():
        package, name = plugin.rsplit('/', 1)
        folder = os.path.join(settings_dir, package)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f'{name}.jupyterlab-settings'), 'w') as f:
            json.dump(values, f)


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 over a copy of the notebooks (the committed ones stay output-free)."""
    try:
        import ipywidgets  # noqa: F401
        import jupyterlab  # noqa: F401
    except ImportError as e:
        _missing(f"{e.name} is not installed (pip install -e '.[notebooks]')")
    work = tmp_path / 'notebooks'
    shutil.copytree(os.path.join(REPO, 'notebooks'), work, ignore=shutil.ignore_patterns('my_port', '.ipynb_*'))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / 'config'), JUPYTER_RUNTIME_DIR=str(tmp_path / 'rt'),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / 'settings'),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / 'workspaces'),
               # kernels import lmdp and parity from this checkout, whatever an editable install points at
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p),
               # one thread in the kernel: beside another xdist worker on two cores, torch's spinning threads
               # would fight that worker for the cores and slow both many times over
               OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    _user_settings(env['JUPYTERLAB_SETTINGS_DIR'])
    port = int(os.environ.get('LMDP_BROWSER_TEST_PORT') or _free_port())
    log_path = tmp_path / 'jupyterlab.log'
    log = open(log_path, 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', f'--port={port}',
                             '--ServerApp.port_retries=0', '--ServerApp.ip=127.0.0.1',
                             f'--IdentityProvider.token={TOKEN}', f'--ServerApp.root_dir={work}'],
                            cwd=str(work), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f'{url}/api/status?token={TOKEN}', timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail('JupyterLab did not start:\n' + (tmp_path / 'jupyterlab.log').read_text()[-3000:])
                time.sleep(0.5)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[notebooks]')")
    options = webdriver.ChromeOptions()
    options.binary_location = _tool(['chromium', 'chromium-browser'], 'chromium')
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
                f'--user-data-dir={tmp_path / "chromium-profile"}', '--window-size=1400,1700'):
        options.add_argument(arg)
    service = Service(executable_path=_tool(['chromedriver'], 'chromium-driver'))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _run_all_cells(driver, wait):
    """Run > Run All Cells, the way a person does it."""
    from selenium.webdriver.common.by import By
    menu = wait.until(lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, '.lm-MenuBar-itemLabel')
                                      if e.text.strip() == 'Run'), None))
    menu.click()
    # the menu's own command id (runmenu:run-all) has changed between JupyterLab versions; its label has not
    item = wait.until(lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, 'li.lm-Menu-item')
                                      if e.text.split('\n')[0].strip() == 'Run All Cells'), None))
    item.click()


def _artifacts() -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(os.path.dirname(ARTIFACTS), '.gitignore'), 'w') as f:
        f.write('# test artifacts (screenshots); not part of the repository\n*\n')
    return ARTIFACTS


def _prompts(driver) -> list:
    """Each code cell's prompt, '[ ]:' (not run), '[*]:' (queued or running) or '[7]:' (done)."""
    from selenium.webdriver.common.by import By
    return [p.text.strip() for p in driver.find_elements(By.CSS_SELECTOR, '.jp-CodeCell .jp-InputArea-prompt')]


def _finished(driver):
    """The tour's last cell printed its verdict, or some cell printed a traceback."""
    from selenium.webdriver.common.by import By
    # the last cell's own output (its source holds the same words, so only output areas count)
    return any(o.text.startswith('00_tour: pipeline() matches transformers') or 'Traceback' in o.text
               for o in driver.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output'))


def _wait_for_the_run(driver, log_path):
    """Wait while cells keep finishing; fail, saying where it stood, when none has for STALL_S seconds.

    A fixed limit on the whole run failed on a busy CI machine without saying whether the run was slow or stuck;
    the prompts tell the two apart, and the server's log says why a kernel died.
    """
    start = last_change = time.time()
    last = _prompts(driver)
    started = False
    while not _finished(driver):
        now = time.time()
        prompts = _prompts(driver)
        if prompts != last:
            last, last_change = prompts, now
        started = started or any(p not in ('[ ]:', '') for p in prompts)
        if not started and now - start > 60:
            # Run All reached a notebook whose kernel was not yet listening: ask once more, as a person would
            _run_all_cells(driver, _wait(driver, 30))
            start = last_change = now
            started = True
        if now - last_change > STALL_S or now - start > RUN_LIMIT_S:
            running = [i for i, p in enumerate(prompts) if p == '[*]:']
            log_tail = log_path.read_text()[-3000:] if log_path.exists() else '(no log)'
            pytest.fail(f'the tour stopped making progress after {now - start:.0f} s: no cell finished in the last '
                        f'{now - last_change:.0f} s; code cells running or queued: {running}; prompts: {prompts}\n'
                        f'JupyterLab log (tail):\n{log_tail}')
        time.sleep(1)
    print(f'Run All Cells took {time.time() - start:.0f} s in the browser')


def _wait(driver, seconds):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds)


def _run_tour(browser, lab):
    """Open the tour, Run All Cells, wait for its check cell; returns the first per-layer view's table."""
    from selenium.webdriver.common.by import By

    url, log_path = lab
    browser.get(f'{url}/lab/tree/00_tour.ipynb?token={TOKEN}')
    wait = _wait(browser, 90)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.jp-NotebookPanel .jp-Cell'))
    # the kernel must be up before the cells are sent, or Run All may land on a notebook with no session yet
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.jp-Notebook-ExecutionIndicator[data-status="idle"]'))
    _run_all_cells(browser, wait)
    _wait_for_the_run(browser, log_path)
    errors = [o.text for o in browser.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output') if 'Traceback' in o.text]
    assert not errors, errors[0][-2000:]
    # widgets render when their model reaches the page, a moment after the cell's output
    _wait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, 'table.lmdp-layer-errors'))
    return browser.find_elements(By.CSS_SELECTOR, 'table.lmdp-layer-errors')[0]


def test_tour_runs_in_jupyterlab_and_shows_the_per_layer_view(lab, browser):
    import torch
    from selenium.webdriver.common.by import By
    from transformers import AutoModelForCausalLM

    from lmdp.tiny import tiny_config
    from parity.taps import reference_taps
    config = tiny_config('llama')                               # what the tour's tiny llama has
    with torch.device('meta'):
        taps = reference_taps(AutoModelForCausalLM.from_config(config, attn_implementation='eager'), config)

    try:
        table = _run_tour(browser, lab)
    except BaseException:
        browser.save_screenshot(os.path.join(_artifacts(), '00_tour_failure.png'))
        raise
    rows = table.find_elements(By.CSS_SELECTOR, 'tr.lmdp-tap-row')
    assert len(rows) == len(taps) == int(table.get_attribute('data-rows'))
    assert table.get_attribute('data-view') == 'local'          # verdicts come from the layer-local view
    assert [r.get_attribute('data-tap') for r in rows] == [t.name for t in taps]
    view = table.find_element(By.XPATH, './ancestor::div[contains(@class, "widget-vbox")][1]')
    points = view.find_elements(By.CSS_SELECTOR, 'svg.lmdp-layer-plot circle.lmdp-point')
    assert len(points) == len(taps)

    _artifacts()
    browser.execute_script('arguments[0].scrollIntoView({block: "start"});', view)
    time.sleep(0.5)
    assert browser.save_screenshot(SCREENSHOT)
    view.screenshot(VIEW_SCREENSHOT)
    print(f'screenshots: {SCREENSHOT}, {VIEW_SCREENSHOT}')
