// fleetgate console: live updates and countdowns. Served by the console itself (no CDN, no
// inline script: the Content-Security-Policy allows scripts from the console only). Every page
// works without it; it only keeps pages current.
//
// The server sends one server-sent event per fleet event, named by its kind ("stations",
// "phones", "audit", "security", "health"), whose data is an HTML fragment the server escaped.
// A page lists in <body data-live="…"> the kinds it follows: when one arrives, the page fetches
// itself again and swaps in its #live part (ticked checkboxes stay ticked). The header's #status
// is refreshed on station, security and health events on every page. A "progress" event (a
// station's firmware download moved) only updates that station's progress bars in place.
"use strict";

(function () {
  var follows = (document.body.getAttribute("data-live") || "").split(" ").filter(Boolean);

  function left(ms) {
    if (ms <= 0) return "expired";
    var s = Math.floor(ms / 1000);
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return (h ? h + " h " : "") + (h || m ? m + " min " : "") + r + " s";
  }

  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-expires]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("data-expires"));
      if (!isNaN(at)) el.textContent = left(at - now);
    });
  }
  tick();
  setInterval(tick, 1000);

  if (!window.EventSource || !window.fetch || !window.DOMParser) return;

  function swap(fresh, id) {
    var now = document.getElementById(id), next = fresh.getElementById(id);
    if (!now || !next) return;
    var ticked = {};
    now.querySelectorAll("input[type=checkbox]:checked").forEach(function (box) {
      ticked[box.name + "=" + box.value] = true;
    });
    next = document.importNode(next, true);
    next.querySelectorAll("input[type=checkbox]").forEach(function (box) {
      if (ticked[box.name + "=" + box.value]) box.checked = true;
    });
    now.replaceWith(next);
  }

  function fetched(url, then) {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) { then(new DOMParser().parseFromString(text, "text/html")); })
      .catch(function () { /* the next event tries again */ });
  }

  var pageTimer = null, statusTimer = null;
  function reloadPage() {
    if (pageTimer) return;
    pageTimer = setTimeout(function () {
      pageTimer = null;
      fetched(location.href, function (fresh) { swap(fresh, "live"); swap(fresh, "status"); tick(); });
    }, 400);
  }
  function reloadStatus() {
    if (statusTimer) return;
    statusTimer = setTimeout(function () {
      statusTimer = null;
      fetched("/status", function (fresh) {
        var now = document.getElementById("status"), next = fresh.getElementById("status");
        if (now && next) now.replaceWith(document.importNode(next, true));
      });
    }, 400);
  }

  var source = new EventSource("/events");
  ["stations", "phones", "audit", "security", "health"].forEach(function (kind) {
    source.addEventListener(kind, function (event) {
      var log = document.getElementById("activity");
      if (log) {
        var quiet = log.querySelector(".quiet");
        if (quiet) quiet.remove();
        log.insertAdjacentHTML("afterbegin", event.data);
        while (log.children.length > 8) log.lastElementChild.remove();
      }
      // A reload of the page brings its header too. Each reload costs fleetd a few audited
      // reads of the operator's command budget, hence the wait that gathers a burst into one.
      if (follows.indexOf(kind) >= 0 || (kind === "health" && follows.length)) reloadPage();
      else if (kind === "stations" || kind === "security" || kind === "health") reloadStatus();
    });
  });
  // A station's firmware download moved: copy the event's figures (attributes of the escaped
  // fragment) into that station's bars and texts, in place: no reload, no read of fleetd.
  source.addEventListener("progress", function (event) {
    var item = new DOMParser().parseFromString(event.data, "text/html").body.firstElementChild;
    if (!item) return;
    var serial = item.getAttribute("data-serial"), received = item.getAttribute("data-received"),
      size = item.getAttribute("data-size"), percent = item.getAttribute("data-percent");
    if (!serial || !received || !size || !percent) return;
    document.querySelectorAll("progress[data-progress]").forEach(function (bar) {
      if (bar.getAttribute("data-progress") !== serial) return;
      bar.setAttribute("max", size);
      bar.setAttribute("value", received);
      bar.textContent = percent + " %";
    });
    document.querySelectorAll("[data-progress-text]").forEach(function (el) {
      if (el.getAttribute("data-progress-text") !== serial) return;
      el.textContent = percent + " %" +
        (el.classList.contains("long") ? " (" + received + " of " + size + " bytes)" : "");
    });
  });
  // What changed between the page's rendering and the stream's opening (or while the stream
  // was down) came as no event: catch up once the stream is open.
  source.addEventListener("open", function () {
    if (follows.length) reloadPage();
    reloadStatus();
    document.body.setAttribute("data-live-ready", "1");
  });
})();
