"""What a person sees in TensorBoard: the real server on two tiny runs (batch's sweep and
prune), its UI opened in headless Chromium, each dashboard read as rendered.

Needs Chromium (`apt-get install chromium`; $CHROMIUM names another binary). Without
it the browser tests skip, saying so, unless REQUIRE_BROWSER=1 (CI sets it), where
they fail. Screenshots of each dashboard are kept in the module's tmp dir."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from browser import Chromium, find_chromium
from helpers import ENV, free_ports, get_json, only_run_dir, run_cli

RUNS = {
    "batch": ["--recipe=batch", "--batch_sizes=16,32", "--epochs=2", "--steps_per_epoch=5"],
    "prune": ["--recipe=prune", "--baseline_epochs=1", "--epochs=1", "--steps_per_epoch=5"],
}
PAGE_TIMEOUT_S = 45  # each dashboard, page load and data included
RELOAD_EVERY_S = 15  # a page that asked before the server had read everything asks again


def browser_required():
    return os.environ.get("REQUIRE_BROWSER", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The module's tmp dir: screenshots, page texts, server and browser logs."""
    return tmp_path_factory.mktemp("tensorboard_browser")


@pytest.fixture(scope="module")
def runs(artifacts):
    """{recipe: (run folder, printed stdout)} of the two tiny runs, under one logdir."""
    logdir = artifacts / "logs"
    out = {}
    for recipe, args in RUNS.items():
        result = run_cli(*args, f"--logdir={logdir}", timeout=240)
        assert result.returncode == 0, (recipe, result.stderr[-3000:])
        out[recipe] = (only_run_dir(logdir, recipe), result.stdout)
    return logdir, out


def post_json(url, payload):
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard(runs, artifacts):
    """The base URL of the real `tensorboard` serving the runs, once it lists every run
    folder that holds events; stopped after the module."""
    logdir, _ = runs
    port = free_ports()[0]
    log = open(artifacts / "tensorboard.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}",
                               "--host=127.0.0.1", f"--port={port}"],
                              stdout=log, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}"
    expected = {p.parent.relative_to(logdir).as_posix() for p in logdir.rglob("events.out.tfevents.*")}
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                if expected <= set(get_json(f"{url}/data/runs")):
                    break
            except OSError:  # not listening yet
                pass
            assert server.poll() is None, (
                f"tensorboard exited with {server.returncode}; see {artifacts / 'tensorboard.log'}")
            assert time.monotonic() < deadline, (
                f"tensorboard did not list the runs {sorted(expected)} within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser(artifacts):
    """page() -> the one headless Chromium page of the module, started on first use. A
    missing Chromium skips the calling test, or fails it under REQUIRE_BROWSER=1."""
    started = {}

    def page():
        if "page" not in started:
            binary = find_chromium()
            if binary is None:
                reason = ("Chromium not found ($CHROMIUM, chromium, chromium-browser, "
                          "google-chrome): install it, e.g. `apt-get install chromium`")
                if browser_required():
                    pytest.fail(f"REQUIRE_BROWSER is set but {reason}", pytrace=False)
                pytest.skip(reason)
            started["page"] = Chromium(binary, artifacts).__enter__()
        return started["page"]

    yield page
    if "page" in started:
        started["page"].__exit__(None, None, None)


def look_at(page, url, name, artifacts, expression):
    """Opens url and waits until expression holds; the screenshot and the page's text are
    kept as artifacts (also when the wait fails). Returns the expression's value."""
    png = artifacts / f"{name}.png"
    page.open(url)
    try:
        return page.wait_for(expression, PAGE_TIMEOUT_S, reload_every=RELOAD_EVERY_S)
    except TimeoutError as e:
        failure = str(e)
    finally:
        try:
            page.screenshot(png)
            (artifacts / f"{name}.txt").write_text(page.text())
        except Exception:  # a dead browser: keep the error that says why
            pass
    pytest.fail(f"{name}: {failure}\n(screenshot: {png})", pytrace=False)


def test_server_reports_hparams_and_text_and_the_batch_size_hparam(tensorboard):
    plugins = get_json(f"{tensorboard}/data/plugins_listing")
    enabled = {name for name, plugin in plugins.items() if plugin.get("enabled")}
    assert {"scalars", "hparams", "text"} <= enabled, enabled
    experiment = post_json(f"{tensorboard}/data/plugin/hparams/experiment", {"experimentName": ""})
    names = [info["name"] for info in experiment.get("hparamInfos", [])]
    assert "batch_size" in names, experiment


def test_time_series_dashboard_shows_the_recipes_tags(tensorboard, browser, artifacts):
    lines = look_at(browser(), f"{tensorboard}/#timeseries", "timeseries", artifacts,
                    "(() => { const lines = deepText().split('\\n');"
                    " return lines.includes('epoch_loss') && lines.includes('epoch_accuracy')"
                    " ? lines : null; })()")
    assert "epoch_loss" in lines and "epoch_accuracy" in lines


def test_hparams_dashboard_lists_the_swept_batch_sizes(tensorboard, browser, artifacts):
    # The table's batch_size column, read by position: the cells below its header (the
    # one in the row that starts with Trial ID, not the filter's in the sidebar).
    column = look_at(browser(), f"{tensorboard}/#hparams", "hparams", artifacts,
                     "(() => { const cells = columnBelow('batch_size', 'Trial ID');"
                     " const values = cells.map(Number);"
                     " return values.includes(16) && values.includes(32) ? cells : null; })()")
    values = {float(cell) for cell in column if cell.replace(".", "", 1).isdigit()}
    assert {16.0, 32.0} <= values, column


def test_text_dashboard_shows_each_runs_printed_table_as_its_summary(tensorboard, runs, browser,
                                                                      artifacts):
    logdir, recipes = runs
    labels = {recipe: run_dir.relative_to(logdir).as_posix()
              for recipe, (run_dir, _) in recipes.items()}
    # Each shown <pre> with the card around it: the nearest ancestor that names the tag.
    cards = look_at(browser(), f"{tensorboard}/#text", "text", artifacts,
                    "(() => { const cards = deepQuery('pre').map(pre => {"
                    "  const card = closestWhere(pre, a => deepText(a).split('\\n').includes('summary'));"
                    "  return {pre: pre.textContent, card: card ? deepText(card).split('\\n') : []}; });"
                    f"  const labels = {json.dumps(sorted(labels.values()))};"
                    "  return labels.every(l => cards.some(c => c.card.includes(l))) ? cards : null;"
                    " })()")
    for recipe, (_, stdout) in recipes.items():
        mine = [c for c in cards if labels[recipe] in c["card"]]
        assert len(mine) == 1, (recipe, cards)
        assert "summary" in mine[0]["card"], mine  # the tag, as the card's title
        shown = [line.rstrip() for line in mine[0]["pre"].splitlines() if line.strip()]
        printed = {line.rstrip() for line in stdout.splitlines()}
        assert len(shown) >= 3 and all(line in printed for line in shown), (recipe, shown, stdout)
