// The strata console: one page, four views (fleet, node, models, rollouts) drawn from /ui/api/* with the session
// cookie, refreshed by server-sent events. Data is only ever set as text (never as HTML), so a node name or label
// cannot inject markup; the Content-Security-Policy allows no inline script either.
"use strict";

const state = { scope: "read", csrf: "", fleet: { selector: "", sort: "name", offset: 0, limit: 50 }, busy: false, again: false, refreshes: 0, opened: {} };
const main = () => document.getElementById("main");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat()) if (child) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin", headers: { accept: "application/json" } }, options || {}));
  if (response.status === 401) { window.location.assign("/ui/login"); throw new Error("signed out"); }
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error((body && body.error) || response.statusText);
  return body;
}

function when(epoch) {
  if (epoch === null || epoch === undefined) return "never";
  return new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}
function ago(epoch) {
  if (!epoch) return "never";
  const s = Math.max(0, Date.now() / 1000 - epoch);
  return s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}
const yes = (flag, good, bad) => el("span", { class: flag ? "ok" : "bad" }, flag ? good : bad);

function countTable(title, counts, key) {
  return el("table", { "data-counts": key },
    el("thead", {}, el("tr", {}, el("th", {}, title), el("th", {}, "nodes"))),
    el("tbody", {}, Object.entries(counts).map(([name, n]) => el("tr", {}, el("td", {}, name), el("td", { "data-count": `${key}:${name}` }, n)))));
}
function card(label, value, key, cls) {
  return el("div", { class: "card" }, el("div", { class: `n ${cls || ""}`, "data-count": key }, value), el("div", { class: "l" }, label));
}

// --- fleet --------------------------------------------------------------------------------------------------

function fleetQuery() {
  const f = state.fleet;
  return new URLSearchParams({ selector: f.selector, sort: f.sort, offset: f.offset, limit: f.limit }).toString();
}

async function loadFleet() { return api(`/ui/api/fleet?${fleetQuery()}`); }

function drawFleet(data) {
  const c = data.counts, f = state.fleet;
  // What is typed but not yet applied survives a redraw: a refresh already loading when the operator typed would
  // otherwise draw the field anew with the applied selector, and Filter would apply that instead.
  const selectorInput = el("input", { name: "selector", placeholder: "label selector: region=eu-west,site=berlin",
    value: f.draft ?? f.selector, oninput: () => { f.draft = selectorInput.value; } });
  const filter = el("form", { class: "filter", onsubmit: (event) => {
    event.preventDefault(); f.selector = selectorInput.value.trim(); f.draft = undefined; f.offset = 0; refresh();
  } }, selectorInput, " ", el("button", { type: "submit" }, "Filter"));
  const versions = el("table", { "data-counts": "versions" },
    el("thead", {}, el("tr", {}, el("th", {}, "model"), el("th", {}, "version"), el("th", {}, "nodes"))),
    el("tbody", {}, Object.entries(c.versions).flatMap(([model, mix]) => Object.entries(mix).map(([version, n]) =>
      el("tr", {}, el("td", {}, model), el("td", {}, version), el("td", { "data-count": `versions:${model}@${version}` }, n))))));
  const columns = [["name", "node"], ["tier", "tier"], ["region", "region"], ["site", "site"], ["profile", "profile"],
    ["online", "online"], ["in_sync", "in sync"], ["attestation", "attested"], ["last_seen", "last seen"]];
  const sortKey = f.sort.replace(/^-/, ""), descending = f.sort.startsWith("-");
  const head = el("tr", {}, columns.map(([key, label]) => el("th", {
    class: `sortable ${key === sortKey ? (descending ? "sorted-desc" : "sorted-asc") : ""}`, "data-sort": key,
    onclick: () => { f.sort = key === sortKey && !descending ? `-${key}` : key; f.offset = 0; refresh(); },
  }, label)), el("th", {}, "models"));
  const rows = data.nodes.map((n) => el("tr", { "data-node": n.name },
    el("td", {}, el("a", { href: `#/node/${encodeURIComponent(n.id)}` }, n.name)), el("td", {}, n.tier), el("td", {}, n.region),
    el("td", {}, n.site), el("td", {}, n.profile), el("td", {}, yes(n.online, "online", "offline")),
    el("td", {}, yes(n.in_sync, "yes", "no")), el("td", {}, n.attestation), el("td", {}, ago(n.last_seen)),
    el("td", {}, Object.entries(n.models).map(([m, v]) => el("span", { class: "pill" }, `${m}@${v}`)))));
  const last = Math.min(f.offset + data.nodes.length, c.total);
  const pager = el("div", { class: "pager" },
    el("button", { type: "button", "data-page": "prev", disabled: f.offset === 0, onclick: () => { f.offset = Math.max(0, f.offset - f.limit); refresh(); } }, "‹ previous"),
    ` nodes ${c.total ? f.offset + 1 : 0}–${last} of ${c.total} `,
    el("button", { type: "button", "data-page": "next", disabled: last >= c.total, onclick: () => { f.offset += f.limit; refresh(); } }, "next ›"));
  return [
    el("h2", {}, "Fleet"), filter,
    el("div", { class: "cards" }, card("nodes", c.total, "total"), card("online", c.online, "online", "ok"),
      card("offline", c.offline, "offline", c.offline ? "bad" : ""), card("in sync", c.in_sync, "in_sync", "ok"),
      card("not in sync", c.out_of_sync, "out_of_sync", c.out_of_sync ? "warn" : "")),
    el("div", { class: "grid" }, countTable("tier", c.by_tier, "tier"), countTable("region", c.by_region, "region"),
      countTable("site", c.by_site, "site"), countTable("profile", c.by_profile, "profile"),
      countTable("attestation", c.by_attestation, "attestation"), versions),
    el("h2", {}, "Nodes"), pager, el("table", { id: "nodes" }, el("thead", {}, head), el("tbody", {}, rows)),
  ];
}

// --- node ---------------------------------------------------------------------------------------------------

function chart(title, series, format) {
  // series: [{name, points: [[x, y], ...]}]; x in epoch minutes. A plain SVG line chart, axes with min/max labels.
  const w = 360, h = 140, left = 44, bottom = 18, top = 8, right = 8;
  const all = series.flatMap((s) => s.points);
  const box = svg("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": title });
  if (!all.length) {
    box.append(svg("text", { x: left, y: h / 2 }, "no data in the last hour"));
    return el("figure", {}, el("figcaption", {}, title), box);
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y1 = Math.max(...ys, 1e-9);
  const X = (x) => left + ((x - x0) / (x1 - x0)) * (w - left - right);
  const Y = (y) => h - bottom - (y / y1) * (h - bottom - top);
  box.append(svg("line", { class: "axis", x1: left, y1: h - bottom, x2: w - right, y2: h - bottom }),
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: h - bottom }),
    svg("text", { x: 2, y: top + 8 }, format(y1)), svg("text", { x: 2, y: h - bottom }, format(0)),
    svg("text", { x: left, y: h - 4 }, when(x0 * 60).slice(11, 16)), svg("text", { x: w - right - 30, y: h - 4 }, when(x1 * 60).slice(11, 16)));
  series.forEach((s, i) => {
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    box.append(svg("path", { class: `s${i}`, d }));
  });
  return el("figure", {}, el("figcaption", {}, title), box,
    el("div", { class: "legend" }, series.map((s, i) => el("span", { class: `s${i}` }, `— ${s.name}`))));
}

function perMinute(minutes, pick) {
  const sums = new Map();
  for (const m of minutes) {
    const v = pick(m);
    if (v === null || v === undefined) continue;
    sums.set(m.minute, v + (sums.get(m.minute) || 0));
  }
  return [...sums.entries()].sort((a, b) => a[0] - b[0]);
}

async function loadNode(id) { return api(`/ui/api/nodes/${encodeURIComponent(id)}`); }

function drawNode(data) {
  const n = data.node;
  const claims = n.claims || {};
  const charts = Object.entries(data.telemetry).map(([model, t]) => {
    const requests = perMinute(t.minutes, (m) => m.requests);
    // errors counts every failure; client_errors the caller's part of them (malformed requests) and shed the part
    // admission control shed (the node was busy): both drawn apart, over all requests, and left out of the error
    // rate, which is what the model or the node failed of the requests it took on (the rollout gates' error rate),
    // so that clients sending garbage and load shedding do not look like a failing model
    const taken = new Map(perMinute(t.minutes, (m) => m.requests - m.client_errors - m.shed));
    const failed = new Map(perMinute(t.minutes, (m) => m.errors - m.client_errors - m.shed));
    const clientErrors = new Map(perMinute(t.minutes, (m) => m.client_errors));
    const shed = new Map(perMinute(t.minutes, (m) => m.shed));
    const share = (counts) => requests.map(([x, r]) => [x, r ? (counts.get(x) || 0) / r : 0]);
    const rate = requests.map(([x]) => [x, taken.get(x) ? (failed.get(x) || 0) / taken.get(x) : 0]);
    const pct = (key) => t.minutes.filter((m) => m[key] !== null).map((m) => [m.minute, m[key]]);
    return el("div", { class: "model-telemetry" }, el("h3", {}, `${model}: the last hour`),
      el("div", { class: "grid" },
        chart("requests per minute", [{ name: "requests", points: requests }], (v) => v.toFixed(0)),
        chart("error rate", [{ name: "errors / requests taken on", points: rate }, { name: "client errors / requests", points: share(clientErrors) }, { name: "shed / requests", points: share(shed) }], (v) => `${(v * 100).toFixed(1)}%`),
        chart("latency (ms)", [{ name: "p50", points: pct("p50_ms") }, { name: "p95", points: pct("p95_ms") }, { name: "p99", points: pct("p99_ms") }], (v) => v.toFixed(1)),
        chart("drift (PSI, worst input)", [{ name: "PSI", points: t.drift.map((d) => [d.minute, d.psi]) }], (v) => v.toFixed(2))),
      t.summaries.length ? el("table", {}, el("thead", {}, el("tr", {}, ["version", "requests", "errors", "error rate", "client errors", "client error rate", "shed", "shed rate", "p50 ms", "p95 ms", "p99 ms", "drift PSI"].map((h) => el("th", {}, h)))),
        el("tbody", {}, t.summaries.map((s) => el("tr", {}, el("td", {}, s.version), el("td", {}, s.requests), el("td", {}, s.errors - s.client_errors - s.shed),
          el("td", {}, `${(s.error_rate * 100).toFixed(2)}%`), el("td", {}, s.client_errors), el("td", {}, `${(s.client_error_rate * 100).toFixed(2)}%`), el("td", {}, s.shed), el("td", {}, `${(s.shed_rate * 100).toFixed(2)}%`), el("td", {}, s.p50_ms ?? "–"), el("td", {}, s.p95_ms ?? "–"), el("td", {}, s.p99_ms ?? "–"),
          el("td", {}, s.drift.length ? Math.max(...s.drift.map((d) => d.psi)).toFixed(3) : "–"))))) : null);
  });
  const pills = (labels, cls) => Object.entries(labels).map(([k, v]) => el("span", { class: `pill ${cls}` }, `${k}=${v}`));
  return [
    el("h2", {}, `Node ${n.name}`),
    el("table", { class: "facts" }, el("tbody", {},
      el("tr", {}, el("th", {}, "state"), el("td", {}, yes(n.online, "online", "offline"), ` · last seen ${ago(n.last_seen)} · `, yes(n.in_sync, "in sync", "not in sync"))),
      el("tr", {}, el("th", {}, "tier"), el("td", {}, n.tier, claims.tier ? el("span", { class: "pill claimed" }, `claims ${claims.tier}`) : null)),
      el("tr", {}, el("th", {}, "labels (assigned)"), el("td", { "data-labels": "assigned" }, pills(n.labels, ""))),
      el("tr", {}, el("th", {}, "labels (claimed)"), el("td", { "data-labels": "claimed" }, claims.labels ? pills(claims.labels, "claimed") : el("span", { class: "muted" }, "same as assigned"))),
      el("tr", {}, el("th", {}, "profile"), el("td", {}, n.profile, n.emulated ? " (emulated)" : "", claims.profile ? el("span", { class: "pill claimed" }, `claims ${claims.profile}`) : null)),
      el("tr", {}, el("th", {}, "runtimes"), el("td", {}, data.runtimes.join(", "))),
      el("tr", {}, el("th", {}, "agent"), el("td", {}, n.agent_version, n.serve_url ? ` · serves ${n.serve_url}` : "")),
      el("tr", {}, el("th", {}, "certificate expires"), el("td", {}, data.certificate_expires_at ? when(data.certificate_expires_at) : "no certificate on record")),
      el("tr", {}, el("th", {}, "attestation"), el("td", {}, n.attestation || "not attested", n.attestation_detail ? el("div", { class: "muted" }, n.attestation_detail) : null)),
      el("tr", {}, el("th", {}, "supply chain"), el("td", {}, n.supply || "unknown")))),
    el("h3", {}, "Models"),
    el("table", { id: "slots" }, el("thead", {}, el("tr", {}, ["model", "active", "variant", "since", "previous", "probation", "pinned"].map((h) => el("th", {}, h)))),
      el("tbody", {}, data.slots.map((s) => el("tr", {}, el("td", {}, s.model), el("td", {}, s.active), el("td", {}, s.variant),
        el("td", {}, when(s.activated_at)), el("td", {}, s.previous || "–"), el("td", {}, s.probation || "–"), el("td", {}, n.pins[s.model] || "–"))))),
    el("h3", {}, "Failures"),
    n.failures.length ? el("table", { id: "failures" }, el("tbody", {}, n.failures.map((f) => el("tr", {},
      el("td", {}, f.model || ""), el("td", {}, f.version || ""), el("td", {}, f.reason || f.message || JSON.stringify(f)))))) : el("p", { class: "muted" }, "none reported"),
    charts.length ? charts : el("p", { class: "muted" }, "no models running, so no telemetry"),
  ];
}

// --- models -------------------------------------------------------------------------------------------------

async function loadModels() { return api("/ui/api/models"); }

function reportText(report) {
  // The optimizer's report of a variant, as stored with it (see ConsoleData.models): accuracy, speed, size, gate.
  if (!report) return el("span", { class: "muted" }, "no optimizer report");
  const parts = [];
  if (report.accuracy !== null) parts.push(`${report.accuracy_metric} ${report.accuracy}`);
  if (report.speedup !== null) parts.push(`speed-up ×${report.speedup}`);
  if (report.throughput !== null) parts.push(`${report.throughput} /s`);
  if (report.latency_p50_ms !== null) parts.push(`p50 ${report.latency_p50_ms} ms`);
  if (report.size_bytes !== null) parts.push(`${(report.size_bytes / 1024).toFixed(0)} KiB`);
  return el("span", { "data-report": "" }, parts.map((p) => el("span", { class: "pill" }, p)),
    report.gate ? el("span", { class: `pill ${report.gate === "passed" ? "ok" : "bad"}` }, `gate ${report.gate}`) : null,
    report.reason ? el("span", { class: "bad" }, ` rejected: ${report.reason}`) : null,
    report.measured_on ? el("span", { class: "muted" }, ` measured on ${report.measured_on}`) : null);
}

function tradeoffPlot(model) {
  // The optimizer's accuracy-against-throughput plot over every variant of every version that has both numbers.
  const points = model.versions.flatMap((v) => v.variants.filter((x) => x.report && x.report.accuracy !== null && x.report.throughput !== null)
    .map((x) => ({ label: `${v.version}/${x.id}`, x: x.report.throughput, y: x.report.accuracy, metric: x.report.accuracy_metric, gate: x.report.gate })));
  if (!points.length) return el("p", { class: "muted", "data-plot": "none" }, "no variant has both an accuracy and a throughput to plot");
  const w = 420, h = 200, left = 52, bottom = 30, top = 10, right = 16;
  const padded = (values) => {  // the values' range with a tenth of it spare each side (a lone value centred)
    const lo = Math.min(...values), hi = Math.max(...values), spare = (hi - lo || Math.abs(hi) || 1) * 0.1;
    return [lo - spare, hi + spare];
  };
  const [x0, x1] = padded(points.map((p) => p.x)), [y0, y1] = padded(points.map((p) => p.y));
  const X = (x) => left + ((x - x0) / (x1 - x0)) * (w - left - right);
  const Y = (y) => h - bottom - ((y - y0) / (y1 - y0)) * (h - bottom - top);
  const box = svg("svg", { class: "chart plot", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": "accuracy against throughput", "data-plot": model.name },
    svg("line", { class: "axis", x1: left, y1: h - bottom, x2: w - right, y2: h - bottom }),
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: h - bottom }),
    svg("text", { x: 2, y: top + 8 }, y1.toPrecision(4)), svg("text", { x: 2, y: h - bottom }, y0.toPrecision(4)),
    svg("text", { x: left, y: h - 16 }, x0.toPrecision(4)), svg("text", { x: w - right - 40, y: h - 16 }, x1.toPrecision(4)),
    svg("text", { x: left + 60, y: h - 2 }, `throughput (inferences/s) → · ↑ ${points[0].metric}`));
  for (const p of points) {
    box.append(svg("circle", { class: `point ${p.gate === "passed" || !p.gate ? "ok" : "bad"}`, cx: X(p.x).toFixed(1), cy: Y(p.y).toFixed(1), r: 4 },
      svg("title", {}, `${p.label}: ${p.metric} ${p.y}, ${p.x} /s`)),
      svg("text", { x: (X(p.x) + (X(p.x) > w / 2 ? -6 : 6)).toFixed(1), y: Math.max(top + 8, Y(p.y) - 6).toFixed(1), "text-anchor": X(p.x) > w / 2 ? "end" : "start" }, p.label));
  }
  return el("figure", {}, el("figcaption", {}, "the optimizer's trade-off: accuracy against throughput"), box);
}

function drawModels(data) {
  if (!data.models.length) return [el("h2", {}, "Models"), el("p", { class: "muted" }, "no models pushed yet")];
  return [el("h2", {}, "Models"), data.models.map((m) => el("section", { class: "model", "data-model": m.name },
    el("h3", {}, m.name),
    el("table", {}, el("thead", {}, el("tr", {}, ["version", "variant", "profile", "runtime", "precision", "size", "signature and TUF", "optimizer's report", "runs on"].map((h) => el("th", {}, h)))),
      el("tbody", {}, m.versions.flatMap((v) => v.variants.map((variant, i) => el("tr", { "data-version": v.version, "data-variant": variant.id },
        el("td", {}, i ? "" : v.version), el("td", {}, variant.id), el("td", {}, variant.profile), el("td", {}, variant.runtime),
        el("td", {}, variant.precision), el("td", {}, `${(variant.size / 1024).toFixed(0)} KiB`),
        el("td", { "data-tuf": "" }, yes(variant.tuf.signed, "signed", "unsigned"), " ", el("span", { class: "muted" }, variant.tuf.text)),
        el("td", {}, reportText(variant.report)),
        el("td", { "data-running": v.version }, i ? "" : (v.running_on.length ? `${v.running_on.length}: ${v.running_on.slice(0, 8).join(", ")}${v.running_on.length > 8 ? " …" : ""}` : "nowhere"))))))),
    tradeoffPlot(m),
    m.history.length ? el("details", {}, el("summary", {}, "history"), el("table", {}, el("tbody", {}, m.history.map((e) => el("tr", {},
      el("td", {}, when(e.at)), el("td", {}, e.node), el("td", {}, e.kind), el("td", {}, e.version || "–"), el("td", {}, e.previous_version ? `from ${e.previous_version}` : "")))))) : null))];
}

// --- rollouts -----------------------------------------------------------------------------------------------

async function loadRollouts() { return api("/ui/api/rollouts"); }

async function act(id, action) {
  try {
    await api(`/ui/api/rollouts/${encodeURIComponent(id)}/${action}`, { method: "POST", headers: { accept: "application/json", "x-csrf-token": state.csrf } });
  } catch (error) {
    document.getElementById(`rollout-error-${id}`).textContent = error.message;
  }
  refresh();
}

function progress(counts) {
  const total = Object.values(counts).reduce((a, b) => a + b, 0) || 1;
  const bar = svg("svg", { class: "bar", viewBox: "0 0 100 10", preserveAspectRatio: "none" });
  let x = 0;
  for (const key of ["healthy", "updating", "rolled_back", "failed"]) {
    const width = ((counts[key] || 0) / total) * 100;
    bar.append(svg("rect", { class: key, x, y: 0, width, height: 10 }));
    x += width;
  }
  return bar;
}

function timeline(r) {
  // The rollout's events in time order (the server's pick: its own, then its nodes' with its model).
  if (r.timeline === null) return el("p", { class: "muted" }, `older rollout: its events are in strata events --since`);
  if (!r.timeline.length) return el("p", { class: "muted", "data-timeline": r.id }, "no events yet");
  // Open while the rollout runs, or as the operator left it: the live redraw keeps what they opened or closed.
  const key = `timeline-${r.id}`, active = r.status === "running" || r.status === "paused";
  return el("details", { open: state.opened[key] ?? active, "data-timeline": r.id, ontoggle: (event) => {
    // Creating it open fires a toggle too: only a state other than the default is the operator's choice.
    if (event.target.open === active) delete state.opened[key]; else state.opened[key] = event.target.open;
  } },
    el("summary", {}, `timeline: ${r.timeline.length} events`),
    el("table", { class: "timeline" }, el("tbody", {}, r.timeline.map((e) => el("tr", { "data-kind": e.kind },
      el("td", {}, when(e.at)), el("td", {}, el("span", { class: `pill kind-${e.kind}` }, e.kind)), el("td", {}, e.node || ""), el("td", {}, e.message))))));
}

function waveTable(waves) {
  // nodes, then the states a rollout's nodes can be in (once it has finished: what they ended as)
  const counted = waves.length ? Object.keys(waves[0]).filter((k) => k !== "wave" && k !== "target") : ["nodes"];
  return el("table", { class: "waves" }, el("thead", {}, el("tr", {}, ["wave", "target", ...counted].map((h) => el("th", {}, h.replace("_", " "))))),
    el("tbody", {}, waves.map((w) => el("tr", { "data-wave": w.wave }, el("td", {}, w.wave), el("td", {}, w.target),
      counted.map((k) => el("td", { "data-field": k }, w[k] ?? 0))))));
}

function keptOut(excluded) {
  // A node that refused the version itself stays out of the rollout for good; the others join its last wave once
  // nothing keeps them out.
  if (!excluded.length) return null;
  const refused = excluded.filter((x) => x.refused).length;
  const nodes = (n) => `${n} ${n === 1 ? "node" : "nodes"}`;
  return el("details", { "data-excluded": excluded.length, "data-refused": refused },
    el("summary", {}, `${nodes(excluded.length)} kept out`, refused ? el("span", { class: "warn" }, ` (${refused} refused the version: out for good)`) : null),
    el("table", {}, el("tbody", {}, excluded.map((x) => el("tr", { "data-refused": Boolean(x.refused) },
      el("td", {}, x.node), el("td", {}, x.refused ? el("span", { class: "warn" }, "refused") : "kept out"), el("td", {}, x.reason))))));
}

function drawRollouts(data) {
  if (!data.rollouts.length) return [el("h2", {}, "Rollouts"), el("p", { class: "muted" }, "no rollouts yet")];
  const admin = state.scope === "admin";
  return [el("h2", {}, "Rollouts"), data.rollouts.map((r) => {
    const active = r.status === "running" || r.status === "paused";
    const actions = admin && active ? el("div", { class: "actions" },
      r.status === "running" ? el("button", { type: "button", "data-action": "pause", onclick: () => act(r.id, "pause") }, "Pause") : null,
      r.status === "paused" ? el("button", { type: "button", "data-action": "resume", onclick: () => act(r.id, "resume") }, "Resume") : null,
      el("button", { type: "button", class: "danger", "data-action": "abort", onclick: () => {
        if (window.confirm(`Abort rollout ${r.id}? Every node of it returns to the version it had.`)) act(r.id, "abort");
      } }, "Abort and roll back")) : null;
    return el("section", { class: "rollout", "data-rollout": r.id, "data-status": r.status },
      el("h3", {}, `#${r.id} ${r.model} → ${r.version} `, el("span", { class: `pill status-${r.status}`, "data-field": "status" }, r.status),
        ` wave `, el("span", { "data-field": "wave" }, `${Math.min(r.wave, r.waves)}/${r.waves}`), " ", progress(r.counts)),
      el("div", { class: "muted" }, r.message, ` · selector ${Object.entries(r.selector).map(([k, v]) => `${k}=${v}`).join(",") || "(all)"} · started ${when(r.created_at)}`),
      actions, el("p", { class: "error", id: `rollout-error-${r.id}` }),
      waveTable(r.waves_detail),
      r.gate_results.length ? el("table", { class: "gates" }, el("thead", {}, el("tr", {}, ["gate", "wave", "value", "threshold", "verdict", "detail"].map((h) => el("th", {}, h)))),
        el("tbody", {}, r.gate_results.map((g) => el("tr", {}, el("td", {}, g.gate), el("td", {}, g.wave + 1), el("td", {}, g.value ?? "no data"),
          el("td", {}, `${g.op} ${g.threshold}`), el("td", {}, el("span", { class: g.passed ? "ok" : "bad" }, g.verdict)), el("td", {}, g.detail))))) : el("p", { class: "muted" }, "no gate judged yet"),
      timeline(r),
      keptOut(r.excluded));
  })];
}

// --- routing and live refresh -------------------------------------------------------------------------------

function route() {
  const [page, arg] = window.location.hash.replace(/^#\/?/, "").split("/");
  if (page === "node" && arg) return { page, load: () => loadNode(decodeURIComponent(arg)), draw: drawNode };
  if (page === "models") return { page, load: loadModels, draw: drawModels };
  if (page === "rollouts") return { page, load: loadRollouts, draw: drawRollouts };
  return { page: "fleet", load: loadFleet, draw: drawFleet };
}

async function refresh() {
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  const current = route();
  try {
    const data = await current.load();
    if (route().page !== current.page) return;
    const focused = document.activeElement && document.activeElement.name;
    main().replaceChildren(...[current.draw(data)].flat(2).filter(Boolean));
    if (focused) { const again = main().querySelector(`[name="${focused}"]`); if (again) again.focus(); }
    state.refreshes += 1;
    document.body.dataset.page = current.page;
    document.body.dataset.refreshes = String(state.refreshes);
    if (state.refreshes === 1) performance.mark("strata-data-drawn");
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === current.page);
  } catch (error) {
    main().replaceChildren(el("p", { class: "error" }, `could not load this page: ${error.message}`));
  } finally {
    state.busy = false;
    if (state.again) { state.again = false; refresh(); }
  }
}

function listen() {
  const live = document.getElementById("live");
  const events = new EventSource("/ui/api/events");
  // Not while hidden, nor while the operator types in a field that a redraw would reset.
  const update = () => { if (!document.hidden && !(document.activeElement && document.activeElement.tagName === "INPUT")) refresh(); };
  events.addEventListener("generation", update);
  events.addEventListener("tick", update);
  events.addEventListener("open", () => live.classList.add("on"));
  events.addEventListener("error", () => live.classList.remove("on"));
}

async function start() {
  const session = await api("/ui/api/session");
  state.scope = session.scope;
  state.csrf = session.csrf;
  document.getElementById("who").textContent = session.scope === "admin" ? "admin" : "read-only";
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/ui/logout", { method: "POST", credentials: "same-origin", headers: { "x-csrf-token": state.csrf } });
    window.location.assign("/ui/login");
  });
  window.addEventListener("hashchange", refresh);
  await refresh();
  listen();
}

start();
