"""`medlava serve`: headless Chromium uploads an image and reads the class and probabilities the page shows,
which equal `medlava predict` on the same image and metadata; an oversized file, a non-image and decompression
bombs are refused with a clear message; uploads never outlive their request's temporary directory."""

import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from medlava.models.cnn import CnnClassifier, Item, MetaEncoder, new_spec, save_cnn
from medlava.serve.app import create_app
from medlava.tools.predict import CnnPredictor
from PIL import Image, ImageDraw

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def lesion(path: Path, colour=(115, 75, 45), size=(80, 60), fmt=None) -> Path:
    im = Image.new("RGB", size, (224, 180, 150))
    ImageDraw.Draw(im).ellipse((20, 12, 60, 46), fill=colour)
    im.save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A metadata CNN checkpoint. Random weights: the page must show what predict computes, whatever that is;
    the head is scaled up so the classes' probabilities differ visibly."""
    torch.manual_seed(0)
    meta = MetaEncoder.fit(
        [
            {"age": 40, "sex": "female", "localization": "back"},
            {"age": 70, "sex": "male", "localization": "face"},
            {"age": 55, "sex": "male", "localization": "scalp"},
        ]
    )
    spec = new_spec("resnet18", CLASSES, 32, [16], 0.0, meta)
    model = CnnClassifier(spec)
    with torch.no_grad():
        model.head[-1].weight.mul_(8)
        model.meta["joint"][0].weight.mul_(5)
    return save_cnn(tmp_path_factory.mktemp("serve") / "ck", model, spec, {"stage": "test"})


@pytest.fixture
def client(checkpoint, tmp_path, monkeypatch):
    """The app with a 1 MB limit; temp files go to tmp/, the working directory is cwd/ (both must stay empty)."""
    for d in ("tmp", "cwd"):
        (tmp_path / d).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path / "cwd")
    predictor = CnnPredictor(checkpoint, torch.device("cpu"))
    yield create_app(predictor, max_upload_mb=1).test_client(), predictor
    assert list((tmp_path / "tmp").iterdir()) == [] and list((tmp_path / "cwd").iterdir()) == []


def post(client, data: bytes, name: str = "lesion.jpg", content_type: str = "image/jpeg", **form):
    return client.post(
        "/predict", data={"image": (io.BytesIO(data), name, content_type), **form}, content_type="multipart/form-data"
    )


def test_page_lists_the_model_and_its_metadata_choices(client):
    c, predictor = client
    page = c.get("/").get_data(as_text=True)
    assert "resnet18 + patient metadata" in page and str(predictor.checkpoint) in page
    assert re.findall(r'<option value="([^"]+)">', page) == [
        "unknown",
        "female",
        "male",
        "unknown",
        "back",
        "face",
        "scalp",
    ]
    assert "Up to 1 MB" in page


def test_upload_gives_predict_s_probabilities(client, tmp_path):
    c, predictor = client
    data = lesion(tmp_path / "a.jpg").read_bytes()
    r = post(c, data, age="62", sex="male", localization="face")
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    shown = dict(body["probabilities"])
    assert [k for k, _ in body["probabilities"]] == CLASSES and body["prediction"] == max(shown, key=shown.get)
    meta = {"age": 62.0, "sex": "male", "localization": "face"}
    ref = predictor.probabilities([Item("a", tmp_path, "a.jpg", meta)])[0]
    np.testing.assert_allclose([shown[k] for k in CLASSES], ref, atol=1e-6)
    bare = dict(post(c, data).get_json()["probabilities"])  # no metadata: median age, "unknown"
    assert max(abs(bare[k] - shown[k]) for k in CLASSES) > 1e-3


def _png(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")  # all zeros: a few kB on disk, `size` pixels once decoded
    return buf.getvalue()


def _truncated_jpeg(tmp: Path) -> bytes:
    data = lesion(tmp / "t.jpg", size=(300, 300)).read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "make, name, form, status, needle",
    [
        (lambda: os.urandom(2**20 + 10_000), "big.jpg", {}, 413, "big.jpg is larger than the 1 MB upload limit"),
        (lambda: os.urandom(3 * 2**20), "huge.jpg", {}, 413, "the upload is larger than the 1 MB limit"),
        (
            lambda: b"Patient notes: lesion on the back, 6 mm.\n",
            "notes.jpg",
            {},
            415,
            "notes.jpg is not an image: its content is none of JPEG, PNG, BMP, TIFF, WEBP",
        ),
        (lambda: _png("1", (12000, 12000)), "bomb.png", {}, 413, "declares too many pixels, a decompression bomb?"),
        (
            lambda: _png("1", (8200, 8200)),
            "bomb2.png",
            {},
            413,
            "bomb2.png is 8200x8200 = 67,240,000 pixels, over the 67,108,864-pixel limit, a decompression bomb?",
        ),
        (lambda: _png("RGB", (1, 1)).replace(b"PNG", b"PNX"), "x.png", {}, 415, "x.png is not an image"),
        (None, "anim.gif", {}, 415, "anim.gif is a GIF image; accepted: JPEG, PNG, BMP, TIFF, WEBP"),
        ("truncated", "cut.jpg", {}, 400, "cut.jpg is a JPEG file that cannot be decoded; re-export it"),
        (lambda: b"", "empty.jpg", {}, 400, "empty.jpg is empty"),
        ("ok", "a.jpg", {"age": "sixty"}, 400, "age 'sixty' is not a number of years from 0 to 120"),
        ("ok", "a.jpg", {"age": "300"}, 400, "age '300' is not a number of years from 0 to 120"),
        ("ok", "a.jpg", {"sex": "other"}, 400, "sex 'other' is not one the model knows (unknown, female, male)"),
    ],
)
def test_refused_uploads_say_why(client, tmp_path, make, name, form, status, needle):
    c, _ = client
    if make is None:
        buf = io.BytesIO()
        Image.new("P", (8, 8)).save(buf, "GIF")
        data = buf.getvalue()
    elif make == "truncated":
        data = _truncated_jpeg(tmp_path)
    elif make == "ok":
        data = lesion(tmp_path / "a.jpg").read_bytes()
    else:
        data = make()
    r = post(c, data, name, **form)
    assert r.status_code == status and needle in r.get_json()["error"], r.get_json()


def test_a_request_without_a_file_is_refused(client):
    r = client[0].post("/predict", data={"age": "50"}, content_type="multipart/form-data")
    assert r.status_code == 400 and "no image in the request" in r.get_json()["error"]


@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
    ".ci/run installs them)",
)
def test_page_in_headless_chromium_shows_what_predict_computes(checkpoint, tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    image = lesion(tmp_path / "lesion.jpg", colour=(45, 30, 30))
    server = subprocess.Popen(
        [sys.executable, "-m", "medlava", "serve", "--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    driver = None
    try:
        line, deadline = "", time.time() + 180
        while "http://" not in line and time.time() < deadline and server.poll() is None:
            line = server.stdout.readline()
        url = re.search(r"http://\S+/", line)
        assert url, f"no URL from medlava serve: {line!r} {server.stderr.read() if server.poll() is not None else ''}"
        url = url.group(0)
        assert url.startswith("http://127.0.0.1:")  # localhost unless --host says otherwise

        options = Options()
        options.binary_location = str(CHROMIUM)
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1200,760",
            f"--user-data-dir={tmp_path / 'profile'}",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        driver.get(url)
        driver.find_element(By.ID, "file").send_keys(str(image))
        driver.find_element(By.ID, "age").send_keys("45")
        Select(driver.find_element(By.ID, "sex")).select_by_value("female")
        Select(driver.find_element(By.ID, "localization")).select_by_value("back")
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "predicted-class").text)
        shown_class = driver.find_element(By.ID, "predicted-class").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#bars .row")
        shown = {r.get_attribute("data-class"): float(r.find_element(By.CLASS_NAME, "prob").text) for r in rows}
        widths = {
            r.get_attribute("data-class"): r.find_element(By.CLASS_NAME, "fill").get_attribute("style") for r in rows
        }
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert list(shown) == CLASSES
        assert driver.find_element(By.CSS_SELECTOR, "#bars .row.top").get_attribute("data-class") == shown_class

        notes = tmp_path / "notes.jpg"
        notes.write_text("not an image at all")
        driver.find_element(By.ID, "file").send_keys(str(notes))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "error").is_displayed())
        error = driver.find_element(By.ID, "error").text
        assert "notes.jpg is not an image" in error and driver.find_element(By.ID, "predicted-class").text == ""
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(30)
    assert Image.open(tmp_path / "page.png").size[0] >= 1000

    # `medlava predict` on the same image with the same metadata
    pd.DataFrame([{"image": "lesion.jpg", "age": 45, "sex": "female", "localization": "back"}]).to_csv(
        tmp_path / "one.csv", index=False
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlava",
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--images",
            str(tmp_path / "one.csv"),
            "--out",
            str(tmp_path / "p.csv"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = pd.read_csv(tmp_path / "p.csv").iloc[0]
    assert shown_class == row["prediction"]
    for c in CLASSES:
        assert shown[c] == pytest.approx(row[f"score_{c}"], abs=5e-5)  # the page shows 4 decimals
        width = float(re.fullmatch(r"width: ([\d.]+)%;", widths[c])[1])  # the bar's length, in percent
        assert width == pytest.approx(100 * row[f"score_{c}"], abs=0.006)
    assert len({round(v, 2) for v in shown.values()}) > 2  # the classes are told apart, not all alike


# -- `medlava serve` over HTTP ---------------------------------------------------------------------------------


def _multipart(name: str, data: bytes, **fields: str) -> tuple[bytes, str]:
    """A multipart/form-data body, by hand: the standard library has no encoder and the test needs no package."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def http_post(
    url: str, name: str, data: bytes, timeout: float = 60, headers: dict | None = None, **fields: str
) -> tuple[int, dict]:
    body, content_type = _multipart(name, data, **fields)
    request = urllib.request.Request(
        url + "predict", data=body, headers={"Content-Type": content_type, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """`medlava serve` as a user starts it (127.0.0.1, its default), with a 1 MB upload limit, connections closed
    after 2 s idle, headers due within 3 s and 8 threads; (its URL, its process)."""
    tmp = tmp_path_factory.mktemp("served")
    with (tmp / "stderr.txt").open("w") as err:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "medlava",
                "serve",
                "--checkpoint",
                str(checkpoint),
                "--port",
                "0",
                "--device",
                "cpu",
                "--max-upload-mb",
                "1",
                "--timeout",
                "2",
                "--header-timeout",
                "3",
                "--threads",
                "8",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=ENV,
            cwd=tmp,
        )
    try:
        line, deadline = "", time.monotonic() + 180
        while "http://" not in line and server.poll() is None and time.monotonic() < deadline:
            if select.select([server.stdout], [], [], 1)[0]:
                line = server.stdout.readline()
        url = re.search(r"http://\S+/", line)
        assert url, f"no URL from medlava serve: {line!r} {(tmp / 'stderr.txt').read_text()[-3000:]}"
        assert url[0].startswith("http://127.0.0.1:")
        yield url[0], server
    finally:
        server.terminate()
        server.wait(30)


def test_served_an_idle_half_sent_request_blocks_nobody_and_is_closed(served, tmp_path):
    url, _ = served
    port = int(url.rsplit(":", 1)[1].strip("/"))
    idle = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:  # headers promise 100 kB, then nothing more comes
        idle.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="
        )
        tic = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and "resnet18" in r.read().decode()
        status, body = http_post(url, "a.jpg", lesion(tmp_path / "a.jpg").read_bytes(), timeout=30)
        assert status == 200 and len(body["probabilities"]) == len(CLASSES), body
        assert time.monotonic() - tic < 10, "another request waited for the idle one"
        assert idle.recv(1024) == b""  # the server hung up on it (after --timeout 2 s idle), well within 30 s
        assert time.monotonic() - tic < 15
    finally:
        idle.close()


def test_served_refuses_an_image_whose_padded_square_is_too_large_without_allocating_it(served):
    url, server = served
    before = peak_rss_mb(server.pid)
    data = _png("RGB", (65536, 1))  # a few hundred bytes; padded to a square: 65536^2 x 3 bytes = 12 GB
    status, body = http_post(url, "wide.png", data, timeout=30)
    assert len(data) < 1000 and status == 413, body
    assert body["error"].startswith(
        "wide.png is 65536x1: padded to a square it would be 65536x65536 = "
        "4,294,967,296 pixels, over the 67,108,864-pixel limit"
    ), body
    assert peak_rss_mb(server.pid) - before < 100


def test_served_accepts_a_phone_s_multi_picture_jpeg(served):
    url, _ = served
    photo = Image.new("RGB", (80, 60), (224, 180, 150))
    ImageDraw.Draw(photo).ellipse((20, 12, 60, 46), fill=(115, 75, 45))
    buf = io.BytesIO()
    photo.save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (40, 30))])  # photo + a preview
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    status, body = http_post(url, "IMG_0001.JPG", buf.getvalue(), timeout=30)
    assert status == 200 and body["file"] == "IMG_0001.JPG", body
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG")  # the same photo alone: the first picture is what was classified
    assert body["probabilities"] == http_post(url, "one.jpg", jpeg.getvalue(), timeout=30)[1]["probabilities"]


def test_served_errors_do_not_show_server_paths(served, tmp_path):
    url, _ = served
    status, body = http_post(url, "cut.jpg", _truncated_jpeg(tmp_path), timeout=30)
    assert status == 400 and body["error"].startswith("cut.jpg is a JPEG file that cannot be decoded"), body
    assert "medlava-serve-" not in body["error"] and tempfile.gettempdir() not in body["error"], body
    assert "image cut.jpg cannot be read" in body["error"], body


def reset_peak_rss(pid: int) -> float:
    """Reset the process's peak RSS to its current RSS (Linux clear_refs); that RSS, in MB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def test_served_refuses_images_larger_than_the_model_needs_and_decodes_a_few_at_once(served):
    url, server = served
    base = reset_peak_rss(server.pid)
    big = _png("RGB", (8192, 8192))  # 200 kB; 200 MB decoded, and every copy (RGB, padding) as much again
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: http_post(url, f"big{i}.png", big, timeout=60), range(4)))
    assert len(big) < 2**20 and all(status == 413 for status, _ in answers), answers
    assert answers[0][1]["error"] == (
        "big0.png is 8192x8192 pixels; this server takes images of at most 4096 pixels "
        "on the longest side (the model sees a few hundred): downscale it before "
        "sending it"
    )
    assert peak_rss_mb(server.pid) - base < 100, "an image was decoded before it was refused"

    # The largest accepted, eight at once on eight threads: two decoded at a time (--decode-slots 2), the model on
    # one thread. Measured: +357 MB; +903 MB with --decode-slots 8 (glibc keeps each decoding thread's buffers).
    base = reset_peak_rss(server.pid)
    largest = _png("RGB", (4096, 4096))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: http_post(url, f"l{i}.png", largest, timeout=120), range(8)))
    assert [status for status, _ in answers] == [200] * 8, answers
    rise = peak_rss_mb(server.pid) - base
    assert rise < 500, f"peak memory rose by {rise:.0f} MB"


def test_served_answers_only_its_own_names_and_same_origin_posts(served, checkpoint, tmp_path):
    url, _ = served
    port = url.rsplit(":", 1)[1].strip("/")
    data = lesion(tmp_path / "a.jpg").read_bytes()

    def get(host: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost:9000"):  # 9000: through `ssh -L 9000:...`
        status, page = get(host)
        assert status == 200 and str(checkpoint) in page, host
    # a page whose DNS name was rebound to 127.0.0.1 reaches the server under its own name
    status, page = get(f"rebound.example:{port}")
    assert status == 400 and str(checkpoint) not in page
    assert json.loads(page)["error"].startswith(
        f"this server answers requests for 127.0.0.1, localhost, ::1 only, not 'rebound.example:{port}'"
    )

    # a form on another site posting here (a "simple" request: the browser sends it without asking first)
    status, body = http_post(url, "a.jpg", data, timeout=30, headers={"Origin": "http://attacker.example"})
    assert status == 403 and "probabilities" not in body, body
    assert body["error"].startswith("a page of another origin (http://attacker.example) may not post here")
    assert http_post(url, "a.jpg", data, timeout=30, headers={"Origin": "null"})[0] == 403  # sandboxed frames, files
    status, body = http_post(url, "a.jpg", data, timeout=30, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and len(body["probabilities"]) == len(CLASSES), body  # the page itself


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""  # the socket must be non-blocking
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_served_half_sent_headers_cannot_keep_the_page_down(served):
    """110 connections that send half a header and then a byte every 0.5 s: never idle for --timeout (2 s), more
    than waitress's 100 connections. The page answers at once, and every one of them is closed by the headers'
    deadline (3 s)."""
    url, _ = served
    port = int(url.rsplit(":", 1)[1].strip("/"))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(110)]
    stop = threading.Event()

    def trickle():
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            s.setblocking(False)
        while not stop.wait(0.5):
            for s in socks:
                try:
                    s.send(b"a")
                except OSError:
                    pass

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        time.sleep(1)
        tic = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and "resnet18" in r.read().decode()
        assert time.monotonic() - tic < 3
        still_open = sum(not closed_by_peer(s) for s in socks)
        assert 0 < still_open <= 16  # the newest ones; older ones were closed by the per-client cap
        deadline = time.monotonic() + 6
        while not all(closed_by_peer(s) for s in socks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(closed_by_peer(s) for s in socks), "a connection outlived the headers' deadline while trickling"
    finally:
        stop.set()
        sender.join()
        for s in socks:
            s.close()
