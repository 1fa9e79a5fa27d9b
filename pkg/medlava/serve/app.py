"""`medlava serve --checkpoint CKPT`: a small local web page (Flask). A person drops an image, optionally fills
in age, sex and localization (metadata CNNs) or a question (VLMs), and sees the predicted class, the per-class
probabilities as a bar chart and, for a VLM, its free-text answer. The numbers come from the same predictor
code as `medlava predict`, so both give the same probabilities for the same image and metadata.

Uploads are checked (medlava.serve.uploads) and exist only in a per-request temporary directory. The server
binds to 127.0.0.1 unless --host says otherwise and has no authentication: to use it from another machine,
forward the port (ssh -L 8000:localhost:8000 HOST) rather than binding to a public address.

It runs on waitress: requests are read in full by an event loop before a worker thread sees them, so a slow or
idle client holds no thread and blocks nobody, and a connection idle for --timeout seconds is closed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, render_template, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from medlava.io import InputError
from medlava.models.cnn import Item
from medlava.serve.uploads import FORMATS, UploadError, save_upload
from medlava.tools.predict import (
    CnnPredictor,
    VlmPredictor,
    add_predictor_args,
    predictor_from_args,
)

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
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


def create_app(predictor: CnnPredictor | VlmPredictor, max_upload_mb: float = 10.0) -> Flask:
    app = Flask(__name__)
    limit = int(max_upload_mb * 2**20)
    app.config["MAX_CONTENT_LENGTH"] = limit + FORM_ALLOWANCE
    # One model call at a time: torch already spreads one over every core, and concurrent calls would only
    # multiply the activations' memory. Reading requests and checking uploads stay concurrent.
    model_lock = threading.Lock()

    @app.get("/")
    def index():
        return render_template("index.html", p=predictor, limit_mb=f"{max_upload_mb:g}", formats=", ".join(FORMATS))

    @app.post("/predict")
    def predict():
        upload = request.files.get("image")
        if upload is None or not upload.filename:
            raise UploadError(400, "no image in the request; choose or drop a file")
        name = Path(upload.filename).name  # only ever shown back as text
        with tempfile.TemporaryDirectory(prefix="medlava-serve-") as tmp:
            path = save_upload(upload.stream, Path(tmp), limit, name)
            try:
                result = answer(Item(name, Path(tmp), path.name, form_meta(request.form, predictor)))
            except InputError as e:  # its message names our temporary file: the sender knows it as `name`
                raise InputError(str(e).replace(str(path), name).replace(tmp, "(upload)")) from None
        return jsonify(result)

    def answer(item: Item) -> dict:
        with model_lock:
            probs = predictor.probabilities([item])[0]
        pairs = [[c, float(v)] for c, v in zip(predictor.classes, probs, strict=True)]  # a list keeps class order
        result = {"file": item.id, "prediction": predictor.classes[int(np.argmax(probs))], "probabilities": pairs}
        if isinstance(predictor, VlmPredictor):
            question = request.form.get("question", "").strip() or predictor.question
            with model_lock:
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
    p = argparse.ArgumentParser(prog="medlava serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predictor_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL is printed)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image accepted")
    p.add_argument("--threads", type=int, default=4, help="worker threads answering requests")
    p.add_argument("--timeout", type=int, default=30,
                   help="seconds a connection may stay idle (mid-request included) before it is closed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        predictor = predictor_from_args(args)
    except (InputError, FileNotFoundError) as e:
        print(f"medlava serve: {e}", file=sys.stderr)
        return 2
    if args.host not in LOCAL_HOSTS:
        log.warning("binding to %s: the page is reachable from other machines and has no authentication", args.host)
    from waitress.server import create_server

    app = create_app(predictor, args.max_upload_mb)
    # waitress buffers a request body before the app sees it: bound that too (the app's own limit, which
    # answers with its clear message, is half of it).
    server = create_server(app, host=args.host, port=args.port, threads=args.threads, channel_timeout=args.timeout,
                           cleanup_interval=max(1, min(args.timeout // 2, 30)),
                           max_request_body_size=2 * app.config["MAX_CONTENT_LENGTH"], ident="medlava")
    # one listening socket, or several (a name such as localhost resolving to IPv4 and IPv6)
    host, port = (server.effective_listen if hasattr(server, "effective_listen")
                  else [(server.effective_host, server.effective_port)])[0]
    host = f"[{host}]" if ":" in host else host
    print(f"medlava serve: {predictor.title} ({predictor.checkpoint}) at http://{host}:{port}/ "
          "(Ctrl-C stops it)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
