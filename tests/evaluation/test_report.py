"""report.html: written for a run and for each kind of study from the files in its folder, self-contained, with the
worst mistakes; opened in a real headless browser where one is installed (CI installs Debian's chromium)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import lmtune
from lmtune.errors import FolderError
from lmtune.evaluation.report import write_report

EXTERNAL = re.compile(r"""(?:src|href|url)\s*[=(]\s*["']?\s*(?:https?:|//|ftp:)""", re.I)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """A tiny three-class run, trained too briefly to be right everywhere."""
    from helpers import make_sentiment_rows, write_csv

    root = tmp_path_factory.mktemp("report")
    rows = make_sentiment_rows(120, seed=3, classes=3)
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": str(write_csv(root / "train.csv", rows)), "validation_size": 0.3, "test_size": 0.3},
           "task": {"name": "classification"}, "method": {"name": "full"},
           "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 2, "log_every": 1},
           "output": {"dir": str(root / "runs"), "name": "three"}}
    return lmtune.train(cfg).run_dir


def test_a_run_report_holds_the_card_curves_scores_and_worst_mistakes(run: Path) -> None:
    page = (run / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((run / "metrics.json").read_text())
    mistakes = json.loads((run / "mistakes.json").read_text())
    assert "mistakes" not in metrics["test"]  # kept out of metrics.json
    for split in ("validation", "test"):
        wrong = mistakes[split]
        n_wrong = sum(metrics[split]["confusion_matrix"][i][j] for i in range(3) for j in range(3) if i != j)
        assert len(wrong) == min(20, n_wrong) > 0
        assert all(m["gold"] != m["predicted"] and m["text"] for m in wrong)
        scores = [m["score"] for m in wrong]
        assert scores == sorted(scores, reverse=True)  # the most confident first
        for m in wrong:  # every listed mistake is shown, its text escaped
            assert f"<td class=\"n\">{m['row']}</td>" in page
    for heading in ("Model card", "Learning curves", "Scores", "Overfitting", "Worst mistakes", "Data"):
        assert f">{heading}</h2>" in page
    assert page.count("data:image/png;base64,") >= 3  # curves, overfitting, confusion matrices
    assert "## Training" not in page and "<h3>Training</h3>" in page  # the card's markdown rendered, one level down
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "<script" not in page
    assert f"{metrics['test']['macro_f1']:.4f}".rstrip("0") in page


def test_the_report_is_written_again_from_the_folder_alone(run: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(run, tmp_path / "copy")
    (copy / "report.html").unlink()
    assert write_report(copy) == copy / "report.html"
    assert (copy / "report.html").read_text() == (run / "report.html").read_text()
    # What the data holds is shown as text, never run as markup.
    mistakes = json.loads((copy / "mistakes.json").read_text())
    mistakes["test"][0]["text"] = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    (copy / "mistakes.json").write_text(json.dumps(mistakes))
    page = write_report(copy).read_text()
    assert "<script" not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)" in page
    with pytest.raises(FolderError, match="no finished run"):
        write_report(tmp_path / "copy" / "plots")


def test_study_reports_link_each_run_s_own_report(tiny_config: dict, tmp_path: Path) -> None:
    from lmtune.studies.compare import compare

    tiny_config["train"].update(epochs=1)
    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tiny_config))
    folder = compare(config, [("full", {}), ("head", {})], output=tmp_path / "cmp")
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "Methods (mean over seeds)" in page and page.count('href="') == 2
    for href in re.findall(r'href="([^"]+)"', page):
        assert (folder / href).is_file() and href.endswith("/report.html") and not href.startswith("/")
    assert "data:image/png;base64," in page and not EXTERNAL.search(page)
    moved = tmp_path / "elsewhere" / "cmp"  # a study folder moved away: its report written again there
    moved.parent.mkdir()
    shutil.move(str(folder), moved)
    from lmtune.evaluation.report import write_report

    again = write_report(moved).read_text(encoding="utf-8")
    hrefs = re.findall(r'href="([^"]+)"', again)
    assert len(hrefs) == 2 and all((moved / href).is_file() for href in hrefs)

    tiny_config["train"]["seeds"] = [1, 2]
    tiny_config["output"].update(dir=str(tmp_path / "s"), name="seeds")
    seeds = lmtune.train(tiny_config).run_dir
    page = (seeds / "report.html").read_text(encoding="utf-8")
    assert "Over the seeds" in page and {"seed-1/report.html", "seed-2/report.html"} <= set(re.findall(r'href="([^"]+)"', page))


# ---- a real browser ------------------------------------------------------------------------------------------------
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# What the browser asks for by itself whatever the page (sign-in, component updates, network time): not the page's.
OWN = re.compile(r"^(CONNECT accounts\.google\.com:443|CONNECT update\.googleapis\.com:443|"
                 r"POST http://update\.googleapis\.com/service/update2/|GET http://clients\d*\.google\.com/time/)")


class Proxy:
    """A listening socket given to the browser as its proxy: every request for anything not on disk comes here."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.settimeout(0.2)
        self.requests: list[str] = []
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            conn.settimeout(2)
            try:
                first = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
            except OSError:
                first = "?"
            if first.strip() and not OWN.match(first):  # (an empty one: a connection opened ahead, never used)
                self.requests.append(first)
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.server.close()


def render(page: Path, out: Path, proxy: Proxy) -> tuple[str, str]:
    """(rendered DOM, browser log) of `page`, and its screenshot in `out`."""
    common = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--proxy-server=http://127.0.0.1:{proxy.server.getsockname()[1]}", "--proxy-bypass-list=<-loopback>",
              f"--user-data-dir={out.parent / 'profile'}", "--enable-logging=stderr", "--log-level=0"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot = subprocess.run([*common, f"--screenshot={out}", "--window-size=1280,2400", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    return dom.stdout, dom.stderr + shot.stderr


def console_errors(log: str) -> list[str]:
    """The page's console messages (errors, blocked loads, script problems) in the browser's log."""
    return [line for line in log.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(BROWSER is None, reason="no headless browser (apt-get install chromium)")
def test_a_browser_renders_the_report_without_errors_or_requests(run: Path, tmp_path: Path) -> None:
    proxy = Proxy()
    try:
        # The check can fail: a page that asks for a remote picture reaches the proxy.
        control = tmp_path / "control.html"
        control.write_text('<html><body><script>console.error("boom")</script>'
                           '<img src="http://example.invalid/x.png"></body></html>')
        _, control_log = render(control, tmp_path / "control.png", proxy)
        assert "boom" in " ".join(console_errors(control_log)), "the browser's log shows no console message"
        assert any("example.invalid" in r for r in proxy.requests), \
            f"the browser never asked the proxy for the picture: the request check would see nothing ({proxy.requests})"
        proxy.requests.clear()
        dom, log = render(run / "report.html", tmp_path / "report.png", proxy)
    finally:
        proxy.close()
    assert proxy.requests == [], proxy.requests
    assert "Worst mistakes" in dom and "<img" in dom
    assert not console_errors(log), console_errors(log)
    shot = (tmp_path / "report.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000  # a page with text and pictures, not a blank one
