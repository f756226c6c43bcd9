// The dev inbox: plain JavaScript, no build step. Every piece of mail text is put into the
// page as text (no innerHTML); a mail's HTML part is shown only inside an <iframe sandbox>
// (no scripts, an opaque origin) loaded from its own endpoint, which sandboxes itself too.
"use strict";

(() => {
  const API = "inbox/api";
  const POLL_MS = 2000;
  const state = { selected: null, tab: "html", query: "", listed: "" };
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function say(text) {
    $("message").textContent = text || "";
  }

  async function api(path, options) {
    const response = await fetch(API + path, Object.assign({ cache: "no-store" }, options || {}));
    if (!response.ok) {
      let detail = "HTTP " + response.status;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) { /* not JSON */ }
      throw new Error(detail);
    }
    return response.status === 204 ? null : response.json();
  }

  const join = (list) => (list && list.length ? list.join(", ") : "");

  async function refreshList() {
    let page;
    try {
      page = await api("/messages?limit=200&q=" + encodeURIComponent(state.query));
    } catch (error) {
      say(error.message);
      return;
    }
    const signature = JSON.stringify(page.messages.map((m) => m.id)) + state.selected;
    if (signature === state.listed) return; // nothing new: keep the list (and scrolling) as is
    state.listed = signature;
    $("count").textContent = page.total === 1 ? "1 message" : page.total + " messages";
    const list = $("list");
    if (!page.messages.length) {
      list.replaceChildren(el("li", { class: "empty" }, state.query ? "no match" : "no mail yet"));
      return;
    }
    list.replaceChildren(...page.messages.map((m) => {
      const item = el("li", { "data-id": m.id, class: m.id === state.selected ? "selected" : "" },
        el("div", { class: "subject" }, m.subject || "(no subject)"),
        el("div", { class: "meta" }, "to " + join(m.to)),
        el("div", { class: "meta" }, new Date(m.received_at).toLocaleString() + " \u00b7 " + m.from));
      item.addEventListener("click", () => open(m.id));
      return item;
    }));
  }

  function showTab(tab) {
    state.tab = tab;
    for (const button of document.querySelectorAll(".tabs button")) {
      button.classList.toggle("active", button.dataset.tab === tab);
    }
    for (const name of ["html", "text", "headers", "raw"]) $("tab-" + name).hidden = name !== tab;
  }

  async function open(id) {
    let m;
    try {
      m = await api("/messages/" + encodeURIComponent(id));
    } catch (error) {
      say(error.message);
      return;
    }
    state.selected = id;
    state.listed = "";
    $("view").hidden = false;
    $("subject").textContent = m.subject || "(no subject)";
    const rows = [["From", m.from], ["To", join(m.to)], ["Cc", join(m.cc)],
      ["Bcc", m.bcc === null ? "(envelope not recorded)" : join(m.bcc)],
      ["Envelope", m.envelope_to ? (m.envelope_from || "<>") + " \u2192 " + join(m.envelope_to) : ""],
      ["Received", new Date(m.received_at).toLocaleString()], ["Size", m.size + " bytes"]];
    $("envelope").replaceChildren(...rows.filter(([, v]) => v).flatMap(([k, v]) => [
      el("dt", {}, k), el("dd", { "data-field": k.toLowerCase() }, v)]));
    const frame = $("html-frame");
    if (m.has_html) {
      frame.src = API + "/messages/" + encodeURIComponent(id) + "/html";
    } else {
      frame.removeAttribute("src");
    }
    $("tab-text").textContent = m.text ?? "(no text part)";
    $("tab-headers").tBodies[0].replaceChildren(...m.headers.map(([name, value]) =>
      el("tr", {}, el("td", {}, name), el("td", {}, value))));
    $("tab-raw").textContent = "";
    try {
      const raw = await fetch(API + "/messages/" + encodeURIComponent(id) + "/raw", { cache: "no-store" });
      $("tab-raw").textContent = await raw.text();
    } catch (error) {
      say(error.message);
    }
    showTab(m.has_html ? "html" : "text");
    refreshList();
  }

  for (const button of document.querySelectorAll(".tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }

  $("search").addEventListener("input", () => {
    state.query = $("search").value;
    refreshList();
  });

  $("delete").addEventListener("click", async () => {
    if (!state.selected) return;
    try {
      await api("/messages/" + encodeURIComponent(state.selected), { method: "DELETE" });
    } catch (error) {
      say(error.message);
    }
    state.selected = null;
    $("view").hidden = true;
    refreshList();
  });

  $("delete-all").addEventListener("click", async () => {
    if (!window.confirm("Delete every captured message?")) return;
    try {
      const result = await api("/messages", { method: "DELETE" });
      say(result.deleted + " deleted");
    } catch (error) {
      say(error.message);
    }
    state.selected = null;
    $("view").hidden = true;
    refreshList();
  });

  refreshList();
  setInterval(refreshList, POLL_MS);
})();
