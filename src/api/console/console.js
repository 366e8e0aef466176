"use strict";
const $ = (id) => document.getElementById(id);
let role = null; // "tenant" | "operator"

async function api(method, path, body) {
  const token = sessionStorage.getItem("lobby-token") || "";
  const res = await fetch(path, {
    method,
    headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  let json = null;
  try { json = JSON.parse(await res.text()); } catch (_) { /* empty or not JSON */ }
  return { status: res.status, json };
}
const why = (r) => r.json && r.json.message ? `${r.json.message} (${r.json.error})` : `HTTP ${r.status}`;

function say(el, ok, text) {
  el.className = ok ? "ok" : "err";
  el.textContent = text;
}

// ---- sign in: the token lives in this tab's session storage, never in the URL -----------
async function signIn() {
  const token = $("token").value.trim();
  if (!token) return say($("who"), false, "Enter a token.");
  sessionStorage.setItem("lobby-token", token);
  await start();
}

async function start() {
  if (!sessionStorage.getItem("lobby-token")) return;
  // Only the operator may list tenants; any valid token may list devices.
  const tenants = await api("GET", "/v1/tenants");
  if (tenants.status === 200) {
    role = "operator";
  } else {
    const probe = await api("GET", "/v1/devices?limit=1");
    if (probe.status !== 200) {
      sessionStorage.removeItem("lobby-token");
      return say($("who"), false, "That token is not accepted: " + why(probe));
    }
    role = "tenant";
  }
  $("token").value = "";
  $("signin-form").hidden = true;
  say($("who"), true, role === "operator" ? "Signed in as the operator." : "Signed in as a tenant.");
  $("signout-btn").hidden = false;
  for (const id of ["claim-box", "devices-box"]) $(id).hidden = false;
  $("tenants-box").hidden = role !== "operator";
  $("tenant-pick").hidden = role !== "operator";
  if (role === "operator") renderTenants(tenants.json.tenants || tenants.json);
  refresh();
}

function signOut() {
  sessionStorage.removeItem("lobby-token");
  location.reload();
}

// ---- claim, then follow the device live -------------------------------------------------
async function claim(code) {
  const body = { code: (code || $("code").value).trim() };
  if (!body.code) return say($("claim-status"), false, "Enter or scan a claim code.");
  if (role === "operator") body.tenant = $("claim-tenant").value;
  const r = await api("POST", "/v1/claims", body);
  if (r.status !== 200 && r.status !== 201) {
    return say($("claim-status"), false, "Not claimed: " + why(r));
  }
  $("code").value = "";
  follow(r.json.device_id);
}

const STEPS = ["unclaimed", "registering", "ready"];
async function follow(id) {
  const status = $("claim-status");
  for (let i = 0; i < 120; i++) {
    const r = await api("GET", `/v1/devices/${id}`);
    if (r.status !== 200) return say(status, false, "Lost track of the device: " + why(r));
    const d = r.json;
    const at = STEPS.indexOf(d.state);
    status.className = d.state === "failed" ? "err" : "ok";
    status.replaceChildren();
    const line = document.createElement("div");
    line.className = "steps";
    for (const [n, s] of STEPS.entries()) {
      const span = document.createElement("span");
      span.textContent = s;
      if (at >= n || d.state === "ready") span.className = "done";
      line.append(span);
    }
    if (d.state === "failed") {
      const span = document.createElement("span");
      span.className = "bad";
      span.textContent = "failed";
      line.append(span);
    }
    const text = document.createElement("div");
    text.id = "claim-state";
    text.dataset.state = d.state;
    text.textContent = d.state === "failed"
      ? `${d.thing_name || id.slice(0, 12)} could not be registered: ${d.error || "unknown error"}`
      : `${d.thing_name || id.slice(0, 12)} is ${d.state}${d.tenant ? " for " + d.tenant : ""}.`;
    status.append(line, text);
    if (d.state === "ready" || d.state === "failed" || d.state === "revoked") break;
    await new Promise((ok) => setTimeout(ok, 1000));
  }
  refresh();
}

// ---- QR: the camera (BarcodeDetector, else jsQR on video frames) or a photo --------------
function decodeImage(source, width, height) {
  const canvas = $("canvas");
  canvas.width = width; canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(source, 0, 0, width, height);
  const img = ctx.getImageData(0, 0, width, height);
  const hit = window.jsQR ? jsQR(img.data, width, height) : null;
  return hit && hit.data.startsWith("LOBBY1:") ? hit.data : null;
}

async function readPhoto() {
  const file = $("photo").files[0];
  if (!file) return;
  const bitmap = await createImageBitmap(file);
  const code = decodeImage(bitmap, bitmap.width, bitmap.height);
  $("photo").value = "";
  if (!code) return say($("claim-status"), false, "No claim code found in that picture.");
  $("code").value = code;
  claim(code);
}

async function scan() {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  } catch (e) {
    return say($("claim-status"), false, "No camera available here; type the code or use a photo.");
  }
  const video = $("video");
  video.srcObject = stream;
  video.style.display = "block";
  await video.play();
  const detector = "BarcodeDetector" in window ? new BarcodeDetector({ formats: ["qr_code"] }) : null;
  const stop = () => { stream.getTracks().forEach((t) => t.stop()); video.style.display = "none"; };
  const tick = async () => {
    let code = null;
    if (detector) {
      const found = await detector.detect(video).catch(() => []);
      const hit = found.find((c) => c.rawValue.startsWith("LOBBY1:"));
      code = hit ? hit.rawValue : null;
    } else if (video.videoWidth) {
      code = decodeImage(video, video.videoWidth, video.videoHeight);
    }
    if (code) { stop(); $("code").value = code; claim(code); } else { requestAnimationFrame(tick); }
  };
  tick();
}

// ---- devices --------------------------------------------------------------------------
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

async function refresh() {
  const state = $("state-filter").value;
  const r = await api("GET", "/v1/devices?limit=500" + (state ? "&state=" + state : ""));
  const rows = $("devices");
  rows.replaceChildren();
  if (r.status !== 200) return;
  for (const d of r.json.devices) {
    const tr = document.createElement("tr");
    tr.dataset.device = d.device_id;
    const action = document.createElement("td");
    if (d.tenant && d.state !== "revoked") {
      const b = document.createElement("button");
      b.textContent = "Unclaim";
      b.setAttribute("aria-label", `Unclaim ${d.thing_name || d.device_id}`);
      b.addEventListener("click", () => unclaim(d));
      action.append(b);
    }
    tr.append(cell(d.device_id.slice(0, 12) + "…", "id"), cell(d.thing_name), cell(d.tenant),
      cell(d.state), cell(d.connected ? `${d.protocol}${d.node ? " on " + d.node : ""}` : "no"),
      cell(d.last_seen), action);
    rows.append(tr);
  }
}

async function unclaim(d) {
  if (!confirm(`Unclaim ${d.thing_name || d.device_id}? It goes back to the lobby.`)) return;
  const r = await api("DELETE", `/v1/claims/${d.device_id}`);
  say($("claim-status"), r.status === 200, r.status === 200 ? `${d.thing_name || "device"} unclaimed.` : "Not unclaimed: " + why(r));
  refresh();
}

// ---- tenants (operator) ----------------------------------------------------------------
function renderTenants(list) {
  const rows = $("tenants");
  rows.replaceChildren();
  $("claim-tenant").replaceChildren();
  for (const t of list || []) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = t.id;
    $("claim-tenant").append(opt);
    const tr = document.createElement("tr");
    tr.dataset.tenant = t.id;
    const edit = document.createElement("td");
    const b = document.createElement("button");
    b.textContent = "Edit";
    b.setAttribute("aria-label", `Edit the endpoint and mode of ${t.id}`);
    b.addEventListener("click", () => editTenant(t));
    edit.append(b);
    tr.append(cell(t.id), cell(t.name), cell(t.mode), cell(t.endpoint), edit);
    rows.append(tr);
  }
}

async function reloadTenants() {
  const r = await api("GET", "/v1/tenants");
  if (r.status === 200) renderTenants(r.json.tenants || r.json);
}

async function createTenant() {
  const body = { id: $("t-id").value.trim(), name: $("t-name").value.trim(),
    endpoint: $("t-endpoint").value.trim() || undefined, mode: $("t-mode").value };
  const r = await api("POST", "/v1/tenants", body);
  if (r.status !== 201) return say($("t-status"), false, "Not created: " + why(r));
  say($("t-status"), true, `Created ${r.json.tenant.id}. Its token (shown once): ${r.json.token}`);
  reloadTenants();
}

async function editTenant(t) {
  const endpoint = prompt(`Endpoint (host name) for ${t.id}`, t.endpoint || "");
  if (endpoint === null) return;
  const mode = prompt(`Mode for ${t.id}: redirect or bridge`, t.mode || "redirect");
  if (mode === null) return;
  const r = await api("PATCH", `/v1/tenants/${t.id}`, { endpoint, mode: mode.trim() });
  say($("t-status"), r.status === 200,
    r.status === 200 ? `${t.id}: ${r.json.mode} to ${r.json.endpoint}.` : "Not changed: " + why(r));
  reloadTenants();
}

$("signin-btn").addEventListener("click", signIn);
$("token").addEventListener("keydown", (e) => { if (e.key === "Enter") signIn(); });
$("signout-btn").addEventListener("click", signOut);
$("claim-btn").addEventListener("click", () => claim());
$("code").addEventListener("keydown", (e) => { if (e.key === "Enter") claim(); });
$("scan-btn").addEventListener("click", scan);
$("photo").addEventListener("change", readPhoto);
$("refresh-btn").addEventListener("click", refresh);
$("state-filter").addEventListener("change", refresh);
$("t-create").addEventListener("click", createTenant);
start();
