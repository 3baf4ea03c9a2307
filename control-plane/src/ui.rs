//! The saga page: one static HTML file that draws sagas live from the
//! graph endpoint (`/v1/sagas/{id}/graph`), polling twice a second. No build
//! step and no third-party script: the page is small enough to read here,
//! and an operator can open it from a control plane with no internet access.
//! A token for an authenticated API goes in the URL fragment
//! (`/ui#token=…`), which browsers never send to the server.

pub(crate) const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Statefabric sagas</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }
  #side { width: 320px; overflow: auto; border-right: 1px solid #ddd; padding: 8px; }
  #main { flex: 1; overflow: auto; padding: 12px; }
  #sagas li { cursor: pointer; list-style: none; padding: 3px 4px; border-radius: 3px; }
  #sagas li.selected { background: #e8eefc; }
  #sagas { padding: 0; }
  .st { font-size: 11px; padding: 1px 5px; border-radius: 3px; background: #eee; margin-left: 4px; }
  .node rect { stroke: #555; rx: 6; }
  .node text, .edge text { font-size: 12px; }
  .edge line, .edge path { stroke: #888; fill: none; marker-end: url(#arrow); }
  .pending rect { fill: #f4f4f4; } .running rect { fill: #bcd7ff; }
  .retrying rect { fill: #ffe39a; } .completed rect { fill: #bfe8c0; }
  .compensating rect { fill: #ffc9a3; } .compensated rect { fill: #d9d2f0; }
  .stuck rect { fill: #ff9d9d; } .end rect { fill: #fff; }
  .reached rect { stroke-width: 3; }
  #error { color: #b00; }
</style>
</head>
<body>
<div id="side"><h3>Sagas</h3><ul id="sagas"></ul></div>
<div id="main">
  <h2 id="title">No saga selected</h2>
  <div id="status" data-status=""></div>
  <div id="error"></div>
  <svg id="graph" width="900" height="420" xmlns="http://www.w3.org/2000/svg">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#888"/></marker></defs>
    <g id="drawing"></g>
  </svg>
  <pre id="timings"></pre>
</div>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const headers = token ? { Authorization: "Bearer " + token } : {};
const fromPath = location.pathname.match(/\/ui\/sagas\/([^/]+)/);
let selected = fromPath ? decodeURIComponent(fromPath[1]) : null;

async function api(path) {
  const r = await fetch(path, { headers });
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
  return r.json();
}

function el(name, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Columns by distance from the first step; end states in the last column.
function layout(g) {
  const steps = g.nodes.filter(n => n.kind === "step");
  const level = {};
  if (steps.length) level[steps[0].id] = 0;
  const queue = steps.length ? [steps[0].id] : [];
  while (queue.length) {
    const id = queue.shift();
    for (const e of g.edges.filter(e => e.from === id)) {
      const node = g.nodes.find(n => n.id === e.to);
      if (node && node.kind === "step" && level[e.to] === undefined) {
        level[e.to] = level[id] + 1; queue.push(e.to);
      }
    }
  }
  let last = Math.max(0, ...Object.values(level)) + 1;
  const pos = {}; const rows = {};
  for (const n of g.nodes) {
    const col = n.kind === "step" ? (level[n.id] ?? last) : last;
    rows[col] = (rows[col] || 0) + 1;
    pos[n.id] = { x: 20 + col * 190, y: 30 + (rows[col] - 1) * 90 };
  }
  return pos;
}

function draw(g) {
  const drawing = document.getElementById("drawing");
  drawing.replaceChildren();
  const pos = layout(g);
  for (const e of g.edges) {
    const a = pos[e.from], b = pos[e.to];
    if (!a || !b) continue;
    const group = el("g", { class: "edge", "data-from": e.from, "data-to": e.to });
    const x1 = a.x + 140, y1 = a.y + 22, x2 = b.x, y2 = b.y + 22;
    if (b.x <= a.x) {
      group.appendChild(el("path", { d: `M ${a.x + 70} ${a.y} C ${a.x + 70} ${a.y - 40}, ${b.x + 70} ${b.y - 40}, ${b.x + 70} ${b.y}` }));
    } else {
      group.appendChild(el("line", { x1, y1, x2, y2 }));
    }
    group.appendChild(el("text", { x: (x1 + x2) / 2 - 30, y: (y1 + y2) / 2 - 4 }, e.label));
    drawing.appendChild(group);
  }
  for (const n of g.nodes) {
    const p = pos[n.id];
    const state = n.kind === "end" ? "end" : (n.state || "pending");
    const reached = n.kind === "end" && g.status && g.status === n.id;
    const group = el("g", { class: "node " + state + (reached ? " reached" : ""), "data-id": n.id, "data-state": state });
    group.appendChild(el("rect", { x: p.x, y: p.y, width: 140, height: 44 }));
    group.appendChild(el("text", { x: p.x + 8, y: p.y + 18 }, n.id));
    const sub = n.kind === "step" ? `${state}${n.attempt ? " #" + n.attempt : ""} · visits ${n.visits}` : "";
    group.appendChild(el("text", { x: p.x + 8, y: p.y + 36 }, sub));
    drawing.appendChild(group);
  }
  document.getElementById("title").textContent = `${g.saga_id} — ${g.definition} v${g.version}`;
  const status = document.getElementById("status");
  status.dataset.status = g.status || "";
  status.textContent = `status ${g.status}${g.paused ? " (paused)" : ""}${g.last_error ? " — " + g.last_error : ""}`;
  document.getElementById("timings").textContent = JSON.stringify(g.timings, null, 2);
}

async function refresh() {
  try {
    const list = await api("/v1/sagas?limit=50");
    const ul = document.getElementById("sagas");
    ul.replaceChildren();
    if (!selected && list.sagas.length) selected = list.sagas[0].saga_id;
    for (const s of list.sagas) {
      const li = document.createElement("li");
      li.dataset.saga = s.saga_id; li.dataset.status = s.status;
      if (s.saga_id === selected) li.className = "selected";
      li.textContent = s.saga_id;
      const st = document.createElement("span"); st.className = "st"; st.textContent = s.status;
      li.appendChild(st);
      li.onclick = () => { selected = s.saga_id; refresh(); };
      ul.appendChild(li);
    }
    if (selected) draw(await api("/v1/sagas/" + encodeURIComponent(selected) + "/graph"));
    document.getElementById("error").textContent = "";
  } catch (err) {
    document.getElementById("error").textContent = String(err);
  }
}
refresh();
setInterval(refresh, 500);
</script>
</body>
</html>
"##;
