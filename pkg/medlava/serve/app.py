"""`medlava serve --checkpoint CKPT`: a small local web page (Flask). A person drops an image, optionally fills
in age, sex and localization (metadata CNNs) or a question (VLMs), and sees the predicted class, the per-class
probabilities as a bar chart and, for a VLM, its free-text answer. The numbers come from the same predictor
code as `medlava predict`, so both give the same probabilities for the same image and metadata.

Uploads are checked (medlava.serve.uploads) and exist only in a per-request temporary directory; at most
--decode-slots of them are decoded at once. The server binds to 127.0.0.1 unless --host says otherwise and has no
authentication: to use it from another machine, forward the port (ssh -L 8000:localhost:8000 HOST) rather than
binding to a public address. It answers only requests addressed to this machine's names (the Host header: a page
of another site that rebinds its DNS name to 127.0.0.1 is refused) and refuses a POST from a page of another
origin (the Origin header that browsers send).

It runs on waitress: requests are read in full by an event loop before a worker thread sees them, so a slow or
idle client holds no thread and blocks nobody, a connection idle for --timeout seconds is closed, and
medlava.serve.guard closes one whose headers take longer than --header-timeout and caps each client's connections.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from flask import Flask, jsonify, render_template, request
from waitress.server import create_server
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from medlava.io import InputError
from medlava.models.cnn import Item
from medlava.serve.guard import CONNECTIONS_PER_CLIENT, HEADER_TIMEOUT_S, guard
from medlava.serve.uploads import FORMATS, MAX_SIDE, UploadError, save_upload
from medlava.tools.predict import CnnPredictor, VlmPredictor, add_predictor_args, predictor_from_args

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")
FORM_ALLOWANCE = 64 * 1024  # the form's text fields travel in the same request as the file


def form_meta(form: MultiDict, predictor: CnnPredictor | VlmPredictor) -> dict:
    """Age, sex and localization from the form for a metadata model; empty fields stay missing, which the
    model fills as in training (median age, "unknown")."""
    if predictor.meta is None:
        return {}
    meta: dict = {}
    age = form.get("age", "").strip()
    if age:
        try:
            value = float(age)
        except ValueError:
            value = float("nan")
        if not 0 <= value <= 120:  # NaN fails too
            raise UploadError(400, f"age {age!r} is not a number of years from 0 to 120; correct it or leave it empty")
        meta["age"] = value
    for key, vocab in (("sex", predictor.meta.sexes), ("localization", predictor.meta.localizations)):
        value = form.get(key, "").strip()
        if value and value not in vocab:
            raise UploadError(400, f"{key} {value!r} is not one the model knows ({', '.join(vocab)})")
        if value:
            meta[key] = value
    return meta


def create_app(
    predictor: CnnPredictor | VlmPredictor,
    max_upload_mb: float = 10.0,
    hosts: tuple[str, ...] = LOCAL_HOSTS,
    max_side: int = MAX_SIDE,
    decode_slots: int = 2,
) -> Flask:
    """The page and /predict, answering requests whose Host is one of `hosts` (lower-case names or addresses,
    IPv6 without brackets; any port)."""
    app = Flask(__name__)
    limit = int(max_upload_mb * 2**20)
    app.config["MAX_CONTENT_LENGTH"] = limit + FORM_ALLOWANCE
    # The model and the decoding of uploads run on threads of their own, whatever --threads is: one model call at
    # a time (torch already spreads one over every core; concurrent calls would multiply the activations' memory),
    # `decode_slots` uploads decoded at once. Bounding the threads bounds the memory: glibc keeps what a thread
    # freed for that thread, so every worker thread that decoded a large image would keep its buffers resident.
    model = ThreadPoolExecutor(1, thread_name_prefix="medlava-model")
    decoder = ThreadPoolExecutor(decode_slots, thread_name_prefix="medlava-decode")

    @app.before_request
    def this_machine_and_same_origin():
        # By hand: werkzeug's TRUSTED_HOSTS cannot match an IPv6 address (it cuts "[::1]" at its first colon).
        if urlsplit(f"//{request.host}").hostname not in hosts:
            return jsonify(
                error=f"this server answers requests for {', '.join(hosts)} only, not "
                f"{request.host[:100]!r}; open it by one of those names (or start it with "
                "--allowed-host NAME)"
            ), 400
        # Browsers send Origin with every POST; a page of another site posting here is refused (tools send none).
        origin = request.headers.get("Origin")
        if request.method == "POST" and origin is not None and origin != f"{request.scheme}://{request.host}":
            return jsonify(
                error=f"a page of another origin ({origin[:100]}) may not post here; open "
                f"{request.scheme}://{request.host}/ itself"
            ), 403
        return None

    @app.get("/")
    def index():
        return render_template("index.html", p=predictor, limit_mb=f"{max_upload_mb:g}", formats=", ".join(FORMATS))

    @app.post("/predict")
    def predict():
        upload = request.files.get("image")
        if upload is None or not upload.filename:
            raise UploadError(400, "no image in the request; choose or drop a file")
        name = Path(upload.filename).name  # only ever shown back as text
        question = request.form.get("question", "").strip() or getattr(predictor, "question", "")
        with tempfile.TemporaryDirectory(prefix="medlava-serve-") as tmp:
            path = decoder.submit(save_upload, upload.stream, Path(tmp), limit, name, max_side).result()
            item = Item(name, Path(tmp), path.name, form_meta(request.form, predictor))
            try:
                result = model.submit(answer, item, question).result()
            except InputError as e:  # its message names our temporary file: the sender knows it as `name`
                raise InputError(str(e).replace(str(path), name).replace(tmp, "(upload)")) from None
        return jsonify(result)

    def answer(item: Item, question: str) -> dict:
        probs = predictor.probabilities([item])[0]
        pairs = [[c, float(v)] for c, v in zip(predictor.classes, probs, strict=True)]  # a list keeps class order
        result = {"file": item.id, "prediction": predictor.classes[int(np.argmax(probs))], "probabilities": pairs}
        if isinstance(predictor, VlmPredictor):
            result.update(question=question, answer=predictor.answer(item, question))
        return result

    @app.errorhandler(UploadError)
    def refused(e: UploadError):
        return jsonify(error=str(e)), e.status

    @app.errorhandler(InputError)
    def bad_input(e: InputError):
        return jsonify(error=str(e)), 400

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_: RequestEntityTooLarge):
        return jsonify(error=f"the upload is larger than the {max_upload_mb:g} MB limit; send a smaller image"), 413

    return app


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="medlava serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_predictor_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL is printed)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name this server may be reached by (the Host header; repeatable). Always allowed: "
        f"{', '.join(LOCAL_HOSTS)} and --host",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image accepted")
    p.add_argument(
        "--max-side",
        type=int,
        default=MAX_SIDE,
        help="longest side of an image accepted, in pixels (decoding costs 3 bytes per pixel)",
    )
    p.add_argument("--decode-slots", type=int, default=2, help="uploads decoded at once")
    p.add_argument("--threads", type=int, default=4, help="worker threads answering requests")
    p.add_argument(
        "--timeout",
        type=int,
        default=30,
        help="seconds a connection may stay idle (mid-request included) before it is closed",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=HEADER_TIMEOUT_S,
        help="seconds from a request's first byte to the end of its headers before it is closed",
    )
    p.add_argument(
        "--max-client-connections",
        type=int,
        default=CONNECTIONS_PER_CLIENT,
        help="open connections per client address; a new one closes that client's oldest idle one",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        predictor = predictor_from_args(args)
    except (InputError, FileNotFoundError) as e:
        print(f"medlava serve: {e}", file=sys.stderr)
        return 2
    names = (*LOCAL_HOSTS, *([] if args.host in ANY_ADDRESS else [args.host]), *args.allowed_host)
    hosts = tuple(dict.fromkeys(h.lower().strip("[]") for h in names))
    if args.host not in LOCAL_HOSTS:
        log.warning(
            "binding to %s: the page is reachable from other machines and has no authentication; it answers "
            "requests for %s (add the names people use with --allowed-host)",
            args.host,
            ", ".join(hosts),
        )
    app = create_app(predictor, args.max_upload_mb, hosts, args.max_side, args.decode_slots)
    # waitress buffers a request body before the app sees it: bound that too (the app's own limit, which
    # answers with its clear message, is half of it).
    server = create_server(
        app,
        host=args.host,
        port=args.port,
        threads=args.threads,
        channel_timeout=args.timeout,
        cleanup_interval=max(1, min(args.timeout // 2, 30)),
        max_request_body_size=2 * app.config["MAX_CONTENT_LENGTH"],
        ident="medlava",
    )
    guard(server, args.header_timeout, args.max_client_connections)
    # one listening socket, or several (a name such as localhost resolving to IPv4 and IPv6)
    host, port = (
        server.effective_listen
        if hasattr(server, "effective_listen")
        else [(server.effective_host, server.effective_port)]
    )[0]
    host = f"[{host}]" if ":" in host else host
    print(
        f"medlava serve: {predictor.title} ({predictor.checkpoint}) at http://{host}:{port}/ (Ctrl-C stops it)",
        flush=True,
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
