"""The page at `/`: drop or choose an image, see the top-k bars, the decision and, where the server has the
model's gradients (a run or a safetensors export), the Grad-CAM overlay. One self-contained HTML document
(no external script, style or font), talking to /v1/model, /v1/predict and /v1/explain only.

`/#selftest` makes the page draw a small image on a canvas and send it as if it had been dropped: a headless
browser can then prove the whole round trip (tests/test_serve.py) without scripting a file chooser.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgcls serve</title>
<link rel="icon" href="data:,">
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; }
  #drop.over { background: #eef5ff; border-color: #36c; }
  #pictures { display: flex; gap: 1rem; justify-content: center; margin: 1rem auto; }
  #pictures figure { margin: 0; text-align: center; display: none; }
  #pictures img { width: 10rem; image-rendering: pixelated; }
  .bar { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
  .bar span.name { width: 9rem; text-align: right; }
  .bar div.fill { background: #36c; height: 1rem; }
  #decision { font-size: 1.3rem; font-weight: 600; }
  #error { color: #b00; }
  small { color: #666; }
</style>
</head>
<body>
<h1>imgcls serve</h1>
<p id="model"><small>loading the model description...</small></p>
<form id="upload" enctype="multipart/form-data">
  <div id="drop">
    <p>Drop an image here, or choose one:</p>
    <input id="file" name="file" type="file" accept="image/*">
    <label>top <input id="topk" name="topk" type="number" min="1" value="3" style="width:3rem"></label>
  </div>
</form>
<div id="pictures">
  <figure id="sent"><img id="preview" alt="the image sent"><figcaption><small>sent</small></figcaption></figure>
  <figure id="explained"><img id="cam" alt="Grad-CAM overlay"><figcaption><small></small></figcaption></figure>
</div>
<p id="decision"></p>
<div id="bars"></div>
<p id="scores"><small></small></p>
<p id="error" role="alert"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let explains = false;  // /v1/model says whether this server can draw Grad-CAM

function show(answer) {
  const p = answer.predictions[0];
  $("decision").textContent = p.rejected ? "unknown (top-1 under the reject threshold)" : p.label;
  $("bars").replaceChildren(...p.top.map((t) => {
    const row = document.createElement("div"), name = document.createElement("span"),
          fill = document.createElement("div"), value = document.createElement("span");
    row.className = "bar"; name.className = "name"; fill.className = "fill";
    name.textContent = t["class"]; value.textContent = (100 * t.probability).toFixed(1) + "%";
    fill.style.width = (20 * t.probability).toFixed(2) + "rem";
    row.append(name, fill, value);
    return row;
  }));
  $("scores").firstChild.textContent = "max-softmax " + p.confidence.toFixed(4) + ", energy " +
      p.energy.toFixed(3) + "; model " + p.model.model + " (data " + p.model.data + ", weights " +
      p.model.weights + ")";
}

async function explain(blob, name, label) {
  const body = new FormData();
  body.append("file", blob, name);
  const reply = await fetch("/v1/explain?class=" + encodeURIComponent(label), {method: "POST", body});
  const answer = await reply.json();
  if (!reply.ok) { $("error").textContent = reply.status + ": " + answer.error; return; }
  $("cam").src = answer.overlay;
  $("explained").querySelector("small").textContent = "Grad-CAM for " + answer["class"] + " (softmax " +
      answer.uncalibrated_probability.toFixed(3) + ")";
  $("explained").style.display = "block";
  document.body.dataset.explained = "1";
}

async function send(blob, name) {
  $("error").textContent = "";
  $("preview").src = URL.createObjectURL(blob);
  $("sent").style.display = "block";
  $("explained").style.display = "none";
  const body = new FormData();
  body.append("file", blob, name);
  const reply = await fetch("/v1/predict?topk=" + encodeURIComponent($("topk").value || "3"),
                            {method: "POST", body});
  const answer = await reply.json();
  if (!reply.ok) { $("error").textContent = reply.status + ": " + answer.error; return; }
  show(answer);
  if (explains) await explain(blob, name, answer.predictions[0].top[0]["class"]);
  document.body.dataset.answered = "1";
}

async function describe() {
  const reply = await fetch("/v1/model");
  const model = await reply.json();
  explains = model.explain;
  $("model").firstChild.textContent = model.model.model + ": " + model.classes.length + " classes (" +
      model.classes.join(", ") + "), " + model.preprocessing.img_size + "px input; reject " + model.reject.default;
}

$("file").addEventListener("change", () => { const f = $("file").files[0]; if (f) send(f, f.name); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  const f = e.dataTransfer.files[0]; if (f) send(f, f.name);
});

function selftest() {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 32;
  const g = canvas.getContext("2d");
  g.fillStyle = "#4a7"; g.fillRect(0, 0, 32, 32); g.fillStyle = "#fff"; g.fillRect(8, 8, 16, 12);
  canvas.toBlob((blob) => send(blob, "selftest.png"), "image/png");
}

describe().then(() => { if (location.hash === "#selftest") selftest(); })
          .catch((e) => { $("error").textContent = "cannot reach the server: " + e; });
</script>
</body>
</html>
"""
