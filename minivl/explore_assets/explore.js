// minivl attention explorer. Written for this page: no framework, no network.
// The data (JSON in #minivl-data) holds 8-bit codes per query row (see the quantization note);
// everything drawn is recorded in window.minivl.shown so a test can check it against the model.
"use strict";

const DATA = JSON.parse(document.getElementById("minivl-data").textContent);
const M = (window.minivl = { data: DATA, sections: {}, shown: null, rope: null, ready: false, error: null });

// ------------------------------------------------------------------ decoding

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function float32s(text) {
  const bytes = base64Bytes(text);
  return new Float32Array(bytes.buffer, 0, bytes.length / 4);
}

async function inflate(bytes) {
  // "deflate" in the Compression Streams standard is the zlib format Python's zlib.compress writes
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// ------------------------------------------------------------------ colour

// inferno, 8 stops, linearly interpolated into a 256-entry table
const INFERNO = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                 [250, 193, 39], [252, 255, 164]];
const LUT = (() => {
  const table = new Uint8Array(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (INFERNO.length - 1), j = Math.min(Math.floor(x), INFERNO.length - 2), f = x - j;
    for (let c = 0; c < 3; c++) table[3 * i + c] = Math.round(INFERNO[j][c] * (1 - f) + INFERNO[j + 1][c] * f);
  }
  return table;
})();
function colour(v) {  // v in [0, 1] -> [r, g, b]
  const i = 3 * Math.max(0, Math.min(255, Math.round(v * 255)));
  return [LUT[i], LUT[i + 1], LUT[i + 2]];
}
const MASKED = [228, 229, 233];
const TOKEN_RED = [190, 30, 30];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

// ------------------------------------------------------------------ one family of maps

class Maps {
  // codes in the order [layer][batch][head][query][key], key <= query only when causal
  constructor(spec, codes, scales) {
    Object.assign(this, { spec, codes, scales });
    this.n = spec.n_tokens;
    this.H = spec.n_heads;
    this.B = spec.n_batch;
    this.causal = spec.causal;
    this.mapSize = this.causal ? (this.n * (this.n + 1)) / 2 : this.n * this.n;
  }
  mapIndex(layer, batch, head) { return (layer * this.B + batch) * this.H + head; }
  rowStart(q) { return this.causal ? (q * (q + 1)) / 2 : q * this.n; }
  rowLength(q) { return this.causal ? q + 1 : this.n; }
  // p̂[q, ·] of one head: code / 255 · row max; masked keys (k > q, causal) are exactly 0
  headRow(layer, batch, head, q) {
    const map = this.mapIndex(layer, batch, head);
    const start = map * this.mapSize + this.rowStart(q), scale = this.scales[map * this.n + q];
    const row = new Float64Array(this.n);
    for (let k = 0; k < this.rowLength(q); k++) row[k] = (this.codes[start + k] / 255) * scale;
    return row;
  }
  // head = an index, or "avg": the mean over heads of p̂
  row(layer, batch, head, q) {
    if (head !== "avg") return this.headRow(layer, batch, head, q);
    const mean = new Float64Array(this.n);
    for (let h = 0; h < this.H; h++) {
      const row = this.headRow(layer, batch, h, q);
      for (let k = 0; k < this.n; k++) mean[k] += row[k] / this.H;
    }
    return mean;
  }
}

function maxOf(values, from = 0, to = values.length) {
  let best = 0;
  for (let i = from; i < to; i++) if (values[i] > best) best = values[i];
  return best;
}
const fmt = (p) => (p >= 0.001 || p === 0 ? p.toFixed(4) : p.toExponential(2));
const headName = (head) => (head === "avg" ? "mean over heads" : `head ${head}`);

function visibleToken(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥") || "∅";
}

// ------------------------------------------------------------------ a section: grid + large view

class SectionView {
  constructor(spec, maps) {
    this.spec = spec;
    this.maps = maps;
    this.layout = spec.layout;
    const n = spec.n_tokens;
    this.skipSink = false;
    this.state = { layer: spec.layers.length - 1, head: "avg", batch: 0,
                   query: this.layout.kind === "patches" ? 0 : n - 1 };
    this.imageOf = new Map();  // token position -> {span, index} for image tokens (text sections)
    for (const span of this.layout.image_spans || [])
      for (let i = 0; i < span.grid * span.grid; i++) this.imageOf.set(span.start + i, { span, index: i });
    this.root = el("section", { class: "card", id: `section-${spec.id}` }, el("h2", { text: spec.label }));
    this.root.append(el("p", { class: "note", text: this.layout.kind === "patches"
      ? "Thumbnails: the CLS token's attention over the patches of the current tile, per layer and head (avg: the mean over heads). Click one to open it; hover a patch or CLS to see where it looks."
      : "Thumbnails: the full token × token map per layer and head (avg: the mean over heads), each query row scaled to its own maximum; grey = masked by the causal mask. Click one to open it; hover a token or a heatmap row." }));
    const row = el("div", { class: "row" });
    row.append(this.buildGrid(), this.buildDetail());
    this.root.append(row);
  }

  // ---------------- the layer × head grid of thumbnails
  buildGrid() {
    const table = el("table", { class: "headgrid" });
    const head = el("tr", {}, el("th", { text: "" }));
    for (let h = 0; h < this.spec.n_heads; h++) head.append(el("th", { text: `h${h}` }));
    head.append(el("th", { text: "avg" }));
    table.append(head);
    this.thumbs = [];
    this.spec.layers.forEach((layerNumber, layer) => {
      const tr = el("tr", {}, el("th", { class: "layer", text: `L${layerNumber}` }));
      for (const h of [...Array(this.spec.n_heads).keys(), "avg"]) {
        const canvas = el("canvas", { class: "thumb", "data-layer": String(layer), "data-head": String(h),
                                      title: `layer ${layerNumber}, ${headName(h)}` });
        canvas.addEventListener("click", () => this.select(layer, h));
        this.thumbs.push({ canvas, layer, head: h });
        tr.append(el("td", {}, canvas));
      }
      table.append(tr);
    });
    this.drawThumbs();
    return el("div", { class: "gridwrap" }, table);
  }

  drawThumbs() {
    for (const thumb of this.thumbs) {
      const { canvas, layer, head } = thumb;
      if (this.layout.kind === "patches") this.drawPatchThumb(canvas, layer, head);
      else this.drawTokenThumb(canvas, layer, head);
      canvas.classList.toggle("selected", layer === this.state.layer && head === this.state.head);
    }
  }

  drawPatchThumb(canvas, layer, head) {
    const [gh, gw] = this.layout.grid, prefix = this.layout.prefix;
    canvas.width = gw; canvas.height = gh; canvas.classList.add("pixel");
    const row = this.maps.row(layer, this.state.batch, head, 0);
    const top = maxOf(row, prefix) || 1;
    const ctx = canvas.getContext("2d"), image = ctx.createImageData(gw, gh);
    for (let i = 0; i < gh * gw; i++) {
      const [r, g, b] = colour(row[prefix + i] / top);
      image.data.set([r, g, b, 255], 4 * i);
    }
    ctx.putImageData(image, 0, 0);
  }

  drawTokenThumb(canvas, layer, head) {
    const n = this.spec.n_tokens;
    canvas.width = n; canvas.height = n;
    canvas.classList.toggle("pixel", n <= 58);
    this.paintMatrix(canvas, layer, head);
  }

  // the n × n map, each row scaled to its own maximum; masked entries grey (the open head's is kept)
  paintMatrix(canvas, layer, head) {
    const ctx = canvas.getContext("2d"), id = `${layer}:${head}:${this.state.batch}:${this.skipSink}`;
    if (canvas === this.heatmap && this.heatmapCache && this.heatmapCache.id === id) {
      ctx.putImageData(this.heatmapCache.image, 0, 0);
      return;
    }
    const n = this.spec.n_tokens, image = ctx.createImageData(n, n);
    for (let q = 0; q < n; q++) {
      const row = this.maps.row(layer, this.state.batch, head, q), top = this.rowTop(row, q);
      for (let k = 0; k < n; k++) {
        const rgb = this.spec.causal && k > q ? MASKED : colour(row[k] / top);
        image.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * (q * n + k));
      }
    }
    ctx.putImageData(image, 0, 0);
    if (canvas === this.heatmap) this.heatmapCache = { id, image };
  }

  // the colour scale's top: the row's largest value, or the largest after position 0 (the attention sink)
  rowTop(row, q) {
    return (this.skipSink && q > 0 ? maxOf(row, 1) : maxOf(row)) || 1;
  }

  select(layer, head) {
    this.state.layer = layer;
    this.state.head = head;
    for (const thumb of this.thumbs)
      thumb.canvas.classList.toggle("selected", thumb.layer === layer && thumb.head === head);
    this.drawDetail();
  }

  // ---------------- the large view
  buildDetail() {
    const detail = el("div", { class: "detail" });
    this.title = el("div", { class: "detail-title" });
    detail.append(this.title);
    if (this.layout.kind === "patches" || (this.layout.image_spans || []).length) detail.append(this.buildTiles());
    if (this.layout.kind === "patches") {
      this.clsChip = el("span", { class: "chip cls", text: "CLS token" });
      this.clsChip.addEventListener("mouseenter", () => this.setQuery(0, this.state.batch));
      detail.append(el("div", { class: "chips" }, el("span", { class: "legend", text: "query: " }), this.clsChip,
                       el("span", { class: "legend", text: "or hover any patch" })));
    } else {
      detail.append(this.buildTokens());
      this.heatmap = el("canvas", { class: "heatmap" });
      const n = this.spec.n_tokens, size = Math.max(260, Math.min(560, 6 * n));
      this.heatmap.width = n; this.heatmap.height = n;
      this.heatmap.style.width = this.heatmap.style.height = `${size}px`;
      this.heatmap.addEventListener("mousemove", (event) => {
        const q = Math.floor((event.offsetY / this.heatmap.clientHeight) * n);
        const k = Math.floor((event.offsetX / this.heatmap.clientWidth) * n);
        this.setQuery(Math.min(n - 1, Math.max(0, q)), 0, Math.min(n - 1, Math.max(0, k)));
      });
      this.rowMarker = el("div", { class: "rowmarker" });
      detail.append(el("div", { class: "heatwrap" }, this.heatmap, this.rowMarker));
    }
    this.readout = el("div", { class: "readout" });
    const bar = el("span", { class: "bar" });
    bar.style.background = `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map((v) => `rgb(${colour(v)})`).join(",")})`;
    detail.append(el("div", { class: "legend" }, "0", bar, "the largest value drawn"), this.readout);
    return detail;
  }

  buildTiles() {
    const images = DATA.images, wrap = el("div", { class: "tiles" });
    const tileIndices = this.layout.kind === "patches" ? this.layout.tiles
                        : (this.layout.image_spans || []).map((span) => span.tile);
    const grid = DATA.tile_grid;
    const main = grid ? grid.columns * grid.rows : tileIndices.length;
    const columns = grid ? grid.columns : tileIndices.length;
    const display = (image) => Math.round(Math.max(160, Math.min(448, 560 / columns, image.width * 4)));
    this.tiles = new Map();
    const gridBox = el("div", { class: "tilegrid" });
    gridBox.style.gridTemplateColumns = `repeat(${columns}, auto)`;
    const extra = el("div", { class: "tilegrid" });
    tileIndices.forEach((imageIndex, position) => {
      const image = images[imageIndex], size = display(image);
      const img = el("img", { src: image.src, alt: image.label, width: String(size), height: String(size) });
      const overlay = el("canvas", { class: "overlay" });
      overlay.style.width = overlay.style.height = `${size}px`;
      const marker = el("div", { class: "marker" });
      const box = el("div", { class: "tile", "data-tile": String(position) }, img, overlay, marker,
                     el("span", { class: "cap", text: image.label }));
      if (this.layout.kind === "patches") {
        box.addEventListener("mousemove", (event) => {
          const [gh, gw] = this.layout.grid, rect = img.getBoundingClientRect();
          const x = Math.floor(((event.clientX - rect.left) / rect.width) * gw);
          const y = Math.floor(((event.clientY - rect.top) / rect.height) * gh);
          if (x < 0 || y < 0 || x >= gw || y >= gh) return;
          this.setQuery(this.layout.prefix + y * gw + x, position);
        });
      }
      this.tiles.set(position, { box, img, overlay, marker, size });
      (position < main ? gridBox : extra).append(box);
    });
    wrap.append(gridBox);
    if (extra.childElementCount) wrap.append(extra);
    return wrap;
  }

  buildTokens() {
    const box = el("div", { class: "tokens" });
    this.tokenSpans = this.spec.tokens.map((text, q) => {
      const image = this.imageOf.get(q);
      const span = el("span", { class: image ? "tok img" : "tok", "data-q": String(q),
                                text: image ? "▣" : visibleToken(text) });
      span.title = image ? `position ${q}: image token ${image.index} of ${DATA.images[image.span.tile].label}`
                         : `position ${q}: ${JSON.stringify(text)}`;
      span.addEventListener("mouseenter", () => this.setQuery(q, 0));
      box.append(span);
      return span;
    });
    const sink = el("input", { type: "checkbox", class: "sink" });
    sink.addEventListener("change", () => { this.skipSink = sink.checked; this.drawDetail(); });
    return el("div", {}, box, el("div", { class: "legend", text:
      "token colour: where the query token (red frame) looks, white 0 → red the row's largest; hatched: masked, a later position" }),
      el("label", { class: "legend" }, sink, " scale the colours without position 0 (decoders park much attention there: the attention sink)"));
  }

  drawDetail() {
    const s = this.state, layerNumber = this.spec.layers[s.layer];
    this.title.textContent = `layer ${layerNumber}, ${headName(s.head)}`;
    if (this.heatmap) this.paintMatrix(this.heatmap, s.layer, s.head);
    this.setQuery(s.query, s.batch, s.key);
  }

  // draw where query q (of batch row / tile `batch`) attends; k: a key under the mouse, for the readout
  setQuery(q, batch = 0, key = undefined) {
    const s = this.state;
    const batchChanged = batch !== s.batch;
    Object.assign(s, { query: q, batch, key });
    if (batchChanged && this.layout.kind === "patches") this.drawThumbs();
    const row = this.maps.row(s.layer, batch, s.head, q);
    const shown = { section: this.spec.id, layer: this.spec.layers[s.layer], layerIndex: s.layer, head: s.head,
                    batch, query: q, row: Array.from(row) };
    if (this.layout.kind === "patches") this.drawPatchQuery(row, shown);
    else this.drawTokenQuery(row, shown, key);
    M.shown = shown;
    this.root.dataset.query = String(q);
    this.root.dataset.layer = String(shown.layer);
    this.root.dataset.head = String(s.head);
  }

  drawPatchQuery(row, shown) {
    const [gh, gw] = this.layout.grid, prefix = this.layout.prefix, q = shown.query;
    const values = row.slice(prefix, prefix + gh * gw), top = maxOf(values) || 1;
    for (const [position, tile] of this.tiles) {
      const ctx = tile.overlay.getContext("2d");
      tile.overlay.width = gw; tile.overlay.height = gh;
      tile.box.classList.toggle("dim", position !== shown.batch);
      tile.marker.style.display = "none";
      if (position !== shown.batch) continue;
      const image = ctx.createImageData(gw, gh);
      for (let i = 0; i < gh * gw; i++) {
        const [r, g, b] = colour(values[i] / top);
        image.data.set([r, g, b, 255], 4 * i);
      }
      ctx.putImageData(image, 0, 0);
      if (q >= prefix) {
        const cell = tile.size / gw, y = Math.floor((q - prefix) / gw), x = (q - prefix) % gw;
        Object.assign(tile.marker.style, { display: "block", left: `${x * cell - 2}px`, top: `${y * cell - 2}px`,
                                           width: `${cell}px`, height: `${cell}px` });
      }
    }
    this.clsChip.classList.toggle("active", q === 0);
    shown.drawn = { kind: "patches", tile: shown.batch, values: Array.from(values) };
    const where = q === 0 ? "the CLS token" : `patch (row ${Math.floor((q - prefix) / gw)}, col ${(q - prefix) % gw})`;
    const tileLabel = DATA.images[this.layout.tiles[shown.batch]].label;
    this.readout.textContent = `query: ${where} of ${tileLabel}\n` +
      `attention to CLS ${fmt(row[0])}, to itself ${fmt(row[q])}, largest to a patch ${fmt(top)}; ` +
      `total over the patches ${fmt(values.reduce((a, b) => a + b, 0))}`;
  }

  drawTokenQuery(row, shown, key) {
    const q = shown.query, n = this.spec.n_tokens, causal = this.spec.causal;
    const top = maxOf(row) || 1, colourTop = this.rowTop(row, q);
    this.tokenSpans.forEach((span, k) => {
      const masked = causal && k > q;
      span.classList.toggle("masked", masked);
      span.classList.toggle("query", k === q);
      if (masked) { span.style.background = ""; span.style.color = ""; return; }
      // tokens: white (0) to red (the row's largest value), so the text stays readable
      const v = Math.min(1, row[k] / colourTop), [r, g, b] = TOKEN_RED.map((c) => Math.round(255 + (c - 255) * v));
      span.style.background = `rgb(${r},${g},${b})`;
      span.style.color = v > 0.6 ? "#fff" : "";
    });
    // frame the query row on the heatmap
    const cell = this.heatmap.clientHeight / n;
    Object.assign(this.rowMarker.style, { top: `${q * cell}px`, height: `${cell}px`,
                                          width: `${(causal ? q + 1 : n) * cell}px` });
    shown.drawn = { kind: "tokens", values: Array.from(row.slice(0, causal ? q + 1 : n)) };
    const spans = this.layout.image_spans || [];
    if (spans.length) shown.drawn.tiles = this.drawSpans(row, q);
    const label = JSON.stringify(this.spec.tokens[q]);
    let text = `query: position ${q} ${label}; it may look at ${causal ? q + 1 : n} of ${n} positions` +
      (causal ? " (the causal mask hides the later ones)" : "") + `; largest ${fmt(top)} to position ${row.indexOf(top)}`;
    if (key !== undefined) text += `\nunder the mouse: key ${key} ${JSON.stringify(this.spec.tokens[key])}: ` +
      (causal && key > q ? "masked (a later position)" : fmt(row[key]));
    if (spans.length) {
      const mass = shown.drawn.tiles.reduce((a, t) => a + (t.values ? t.values.reduce((x, y) => x + y, 0) : 0), 0);
      text += `\nattention on the image tokens (all tiles): ${fmt(mass)}`;
    }
    this.readout.textContent = text;
  }

  // a text token's attention over the image tokens of each tile, one colour scale for all tiles
  drawSpans(row, q) {
    const spans = this.layout.image_spans;
    let top = 0;
    for (const span of spans) if (q >= span.start) top = Math.max(top, maxOf(row, span.start, span.start + span.grid ** 2));
    return spans.map((span, position) => {
      const tile = this.tiles.get(position), g = span.grid, ctx = tile.overlay.getContext("2d");
      tile.overlay.width = g; tile.overlay.height = g;
      const visible = !this.spec.causal || q >= span.start;
      tile.box.classList.toggle("dim", !visible);
      if (!visible) return { tile: span.tile, values: null };
      const values = row.slice(span.start, span.start + g * g), image = ctx.createImageData(g, g);
      for (let i = 0; i < g * g; i++) {
        const [r, gg, b] = colour(values[i] / (top || 1));
        image.data.set([r, gg, b, 255], 4 * i);
      }
      ctx.putImageData(image, 0, 0);
      return { tile: span.tile, values: Array.from(values) };
    });
  }
}

// ------------------------------------------------------------------ the RoPE atlas

const ROPE_COLOURS = { default: "#1f77b4", linear: "#ff7f0e", dynamic: "#2ca02c", yarn: "#d62728",
                       llama3: "#9467bd", su: "#8c564b", phi3_yarn: "#e377c2" };

class RopeAtlas {
  constructor(spec) {
    this.spec = spec;
    this.half = spec.head_dim / 2;
    this.inv = {};
    for (const t of spec.types) this.inv[t] = float32s(spec.inv_freq[t]);
    let lo = Infinity, hi = 0;
    for (const t of spec.types) for (const w of this.inv[t]) { lo = Math.min(lo, w); hi = Math.max(hi, w); }
    this.freqRange = [lo, hi];
    this.waveRange = [(2 * Math.PI) / hi, Math.max((2 * Math.PI) / lo, spec.stops[spec.stops.length - 1])];
    this.root = el("section", { class: "card", id: "rope" }, el("h2", { text: "RoPE atlas" }));
    this.root.append(el("p", { class: "note", text:
      `Pair j of a ${spec.head_dim}-dim head turns by ω_j radians per position (θ = ${spec.theta}, factor ${spec.factor}, ` +
      `original context O = ${spec.original_max}). Move the context length L: linear, YaRN and Llama 3 are fixed ` +
      `recipes; dynamic NTK keeps the default frequencies until L passes max_position_embeddings (= O here), then ` +
      `enlarges the base; su / phi3_yarn switch from short to long factors past O. Values precomputed by minivl.rope.` }));
    this.slider = el("input", { type: "range", id: "rope-slider", min: "0", max: String(spec.stops.length - 1), step: "1" });
    this.slider.value = String(Math.max(0, spec.stops.indexOf(spec.original_max)));
    this.lengthOut = el("output", { id: "rope-L" });
    this.slider.addEventListener("input", () => this.draw());
    this.root.append(el("div", { id: "rope-controls" }, el("span", { text: "context length L" }), this.slider, this.lengthOut));
    this.freqCanvas = el("canvas", { class: "plot", id: "rope-freq", width: "560", height: "340" });
    this.waveCanvas = el("canvas", { class: "plot", id: "rope-wave", width: "560", height: "340" });
    for (const canvas of [this.freqCanvas, this.waveCanvas])
      canvas.addEventListener("mousemove", (event) => this.hoverPair(event, canvas));
    this.root.append(el("div", { class: "row" }, this.freqCanvas, this.waveCanvas));
    this.table = el("table", { class: "rope" });
    this.pair = el("div", { class: "readout", id: "rope-pair", text: "hover a chart to read one pair's ω and wavelength" });
    this.root.append(this.table, this.pair);
  }

  values(index) {
    const out = {};
    for (const t of this.spec.types) out[t] = Array.from(this.inv[t].subarray(index * this.half, (index + 1) * this.half));
    return out;
  }

  regime(t, index) {
    const L = this.spec.stops[index], O = this.spec.original_max, s = this.spec.attention_scaling[t][index];
    if (t === "dynamic") return L > O ? `L > max_position_embeddings: base enlarged to ${this.spec.dynamic_base[index].toPrecision(6)}`
                                      : `L ≤ max_position_embeddings: base ${this.spec.theta} unchanged (= default)`;
    if (t === "su" || t === "phi3_yarn") return (L > O ? "L > O: long factors" : "L ≤ O: short factors") + `, scaling ${s.toFixed(4)}`;
    if (t === "yarn") return `static, attention scaling ${s.toFixed(4)}`;
    return "static";
  }

  draw() {
    const index = Number(this.slider.value), L = this.spec.stops[index], values = this.values(index);
    this.lengthOut.textContent = `${L.toLocaleString("en-US")}`;
    const series = this.spec.types.map((t) => ({ name: t, ys: values[t] }));
    plotLog(this.freqCanvas, series, this.freqRange, "ω_j (radians per position)", []);
    const waves = series.map((s) => ({ name: s.name, ys: s.ys.map((w) => (2 * Math.PI) / w) }));
    plotLog(this.waveCanvas, waves, this.waveRange, "wavelength 2π/ω_j (positions)",
            [{ y: L, label: `L = ${L}`, colour: "#d0342c", dash: [] },
             { y: this.spec.original_max, label: `O = ${this.spec.original_max}`, colour: "#777", dash: [5, 4] }]);
    this.table.replaceChildren(el("tr", {}, el("th", { text: "scaling" }), el("th", { text: "regime at this L" }),
                                  el("th", { text: "pairs turning at least once within L" })));
    const regimes = {};
    for (const t of this.spec.types) {
      regimes[t] = this.regime(t, index);
      const turning = values[t].filter((w) => (2 * Math.PI) / w <= L).length;
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = ROPE_COLOURS[t] || "#333";
      this.table.append(el("tr", { "data-type": t }, el("td", {}, swatch, t), el("td", { text: regimes[t] }),
                           el("td", { text: `${turning} of ${this.half}` })));
    }
    M.rope = { index, L, values, regimes };
  }

  hoverPair(event, canvas) {
    const j = Math.round(((event.offsetX - PLOT.left) / (canvas.width - PLOT.left - PLOT.right)) * (this.half - 1));
    if (j < 0 || j >= this.half) return;
    const values = this.values(Number(this.slider.value));
    this.pair.textContent = `pair j = ${j}:  ` + this.spec.types.map((t) =>
      `${t} ω ${values[t][j].toExponential(3)}, λ ${((2 * Math.PI) / values[t][j]).toPrecision(4)}`).join("   ·   ");
  }
}

// a line chart with a log10 y axis; x = pair index
const PLOT = { left: 64, right: 12, top: 14, bottom: 38 };
function plotLog(canvas, series, range, yLabel, hlines) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  const x0 = PLOT.left, x1 = W - PLOT.right, y0 = H - PLOT.bottom, y1 = PLOT.top;
  const lo = Math.floor(Math.log10(range[0])), hi = Math.ceil(Math.log10(range[1]));
  const n = series[0].ys.length;
  const X = (j) => x0 + ((x1 - x0) * j) / Math.max(1, n - 1);
  const Y = (v) => y0 - ((y0 - y1) * (Math.log10(v) - lo)) / Math.max(1e-9, hi - lo);
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
  ctx.font = "11px system-ui, sans-serif"; ctx.strokeStyle = "#e6e8ee"; ctx.fillStyle = "#555";
  const step = Math.max(1, Math.ceil((hi - lo) / 8));
  for (let e = lo; e <= hi; e += step) {
    ctx.beginPath(); ctx.moveTo(x0, Y(10 ** e)); ctx.lineTo(x1, Y(10 ** e)); ctx.stroke();
    ctx.fillText(`1e${e}`, 8, Y(10 ** e) + 4);
  }
  for (let j = 0; j < n; j += Math.max(1, Math.round(n / 8))) ctx.fillText(String(j), X(j) - 4, y0 + 14);
  ctx.fillText("dimension pair j", (x0 + x1) / 2 - 40, H - 6);
  ctx.fillText(yLabel, x0 + 6, y1 + 10);
  for (const line of hlines) {
    ctx.strokeStyle = line.colour; ctx.setLineDash(line.dash); ctx.lineWidth = 1.2;
    ctx.beginPath(); ctx.moveTo(x0, Y(line.y)); ctx.lineTo(x1, Y(line.y)); ctx.stroke();
    // labels left and right, so that L and O stay readable where they meet
    ctx.setLineDash([]); ctx.fillStyle = line.colour;
    ctx.fillText(line.label, line.dash.length ? x1 - 90 : x0 + 8, Y(line.y) - 4);
  }
  series.forEach((s, index) => {
    ctx.strokeStyle = ROPE_COLOURS[s.name] || "#333"; ctx.lineWidth = 1.6;
    ctx.beginPath();
    s.ys.forEach((v, j) => (j ? ctx.lineTo(X(j), Y(v)) : ctx.moveTo(X(j), Y(v))));
    ctx.stroke();
    ctx.fillStyle = ROPE_COLOURS[s.name] || "#333";
    ctx.fillText(s.name, x0 + 8 + 70 * (index % 7), y0 - 8);
  });
  ctx.strokeStyle = "#999"; ctx.lineWidth = 1; ctx.strokeRect(x0, y1, x1 - x0, y0 - y1);
}

// ------------------------------------------------------------------ start

async function start() {
  const app = document.getElementById("app");
  document.getElementById("facts").textContent = DATA.facts.join(" · ");
  const views = [];
  for (const spec of DATA.sections) {
    const codes = await inflate(base64Bytes(spec.maps.codes));
    const maps = new Maps(spec, codes, float32s(spec.maps.scales));
    const expected = spec.layers.length * spec.n_batch * spec.n_heads * maps.mapSize;
    if (codes.length !== expected) throw new Error(`section ${spec.id}: ${codes.length} codes, expected ${expected}`);
    const view = new SectionView(spec, maps);
    M.sections[spec.id] = view;
    views.push(view);
  }
  document.getElementById("loading").remove();
  for (const view of views) { app.append(view.root); view.drawDetail(); }
  if (DATA.rope) {
    const atlas = new RopeAtlas(DATA.rope);
    M.atlas = atlas;
    app.append(atlas.root);
    atlas.draw();
  }
  const footer = el("footer", { text: `How the numbers are stored: ${DATA.quantization}` });
  document.body.append(footer);
  M.ready = true;
}

start().catch((error) => {
  M.error = String(error && error.stack ? error.stack : error);
  document.getElementById("app").prepend(el("pre", { text: `the page failed: ${M.error}` }));
});
