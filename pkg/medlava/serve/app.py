"""`medlava serve --checkpoint CKPT`: a small local web page (Flask). A person drops an image, optionally fills
in age, sex and localization (metadata CNNs) or a question (VLMs), and sees the predicted class, the per-class
probabilities as a bar chart and, for a VLM, its free-text answer. The numbers come from the same predictor
code as `medlava predict`, so both give the same probabilities for the same image and metadata.

Uploads are checked (medlava.serve.uploads) and exist only in a per-request temporary directory. The server
binds to 127.0.0.1 unless --host says otherwise and has no authentication: to use it from another machine,
forward the port (ssh -L 8000:localhost:8000 HOST) rather than binding to a public address.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, render_template, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.serving import make_server

from medlava.io import InputError
from medlava.models.cnn import Item
from medlava.predict import CnnPredictor, VlmPredictor, add_predictor_args, predictor_from_args
from medlava.serve.uploads import FORMATS, UploadError, save_upload

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
            item = Item(name, Path(tmp), path.name, form_meta(request.form, predictor))
            probs = predictor.probabilities([item])[0]
            pairs = [[c, float(v)] for c, v in zip(predictor.classes, probs, strict=True)]  # a list keeps class order
            result = {"file": name, "prediction": predictor.classes[int(np.argmax(probs))], "probabilities": pairs}
            if isinstance(predictor, VlmPredictor):
                question = request.form.get("question", "").strip() or predictor.question
                result.update(question=question, answer=predictor.answer(item, question))
        return jsonify(result)

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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        predictor = predictor_from_args(args)
    except (InputError, FileNotFoundError) as e:
        print(f"medlava serve: {e}", file=sys.stderr)
        return 2
    if args.host not in LOCAL_HOSTS:
        log.warning("binding to %s: the page is reachable from other machines and has no authentication", args.host)
    server = make_server(args.host, args.port, create_app(predictor, args.max_upload_mb))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"medlava serve: {predictor.title} ({predictor.checkpoint}) at http://{host}:{server.server_port}/ "
          "(Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
