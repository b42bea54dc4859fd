// The worklist's live part: server-sent events say the rows changed; htmx fetches them again. A new STAT is
// announced (banner, optional sound the reader can switch off, kept in localStorage). Without this script the
// page still works: filters and paging are plain links and forms, and a reload shows the current rows.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource) { return; }
  var state = document.getElementById("live-state");
  var alertBox = document.getElementById("stat-alert");
  var sound = document.getElementById("sound");
  var soundOn = localStorage.getItem("ptx-sound") !== "off";
  var source = null;
  var base = live.dataset.events.split("/events")[0];

  function showSound() {
    sound.hidden = false;
    sound.setAttribute("aria-pressed", soundOn ? "true" : "false");
    sound.textContent = "Sound for a new STAT: " + (soundOn ? "on" : "off");
  }
  sound.addEventListener("click", function () {
    soundOn = !soundOn;
    localStorage.setItem("ptx-sound", soundOn ? "on" : "off");
    showSound();
  });
  showSound();

  function beep() {
    if (!soundOn) { return; }
    try {
      var context = new (window.AudioContext || window.webkitAudioContext)();
      var tone = context.createOscillator();
      var gain = context.createGain();
      tone.frequency.value = 880;
      gain.gain.value = 0.2;
      tone.connect(gain).connect(context.destination);
      tone.start();
      tone.stop(context.currentTime + 0.35);
    } catch (e) { /* no audio device: the banner is the cue */ }
  }

  function shown() {
    var found = {};
    live.querySelectorAll("tr[data-study]").forEach(function (row) {
      found[row.dataset.study] = row.dataset.priority;
    });
    return found;
  }

  function cueStat(uids, count) {
    if (!count) { return; }
    alertBox.textContent = "";
    alertBox.appendChild(document.createTextNode(count === 1 ? "New STAT study: " : count + " new STAT studies: "));
    uids.slice(0, 5).forEach(function (uid, i) {
      var link = document.createElement("a");
      link.href = base + "/studies/" + encodeURIComponent(uid);
      link.textContent = "…" + uid.slice(-14);
      if (i) { alertBox.appendChild(document.createTextNode(", ")); }
      alertBox.appendChild(link);
    });
    alertBox.hidden = false;
    beep();
  }

  function refresh(event) {
    var before = shown();
    htmx.ajax("GET", live.dataset.rows, {target: "#rows", swap: "outerHTML"}).then(function () {
      var after = shown();
      live.querySelectorAll("tr[data-study]").forEach(function (row) {
        if (before[row.dataset.study] !== after[row.dataset.study]) { row.classList.add("fresh"); }
      });
      if (event) { cueStat(event.stat, event.stat_count); }
    });
  }

  function connect() {
    var version = (document.getElementById("rows") || {dataset: {}}).dataset.version || "";
    source = new EventSource(live.dataset.events + (live.dataset.events.indexOf("?") < 0 ? "?" : "&") +
                             "v=" + encodeURIComponent(version));
    source.addEventListener("open", function () { state.textContent = "Live: new studies appear by themselves."; });
    source.addEventListener("change", function (message) { refresh(JSON.parse(message.data)); });
    source.addEventListener("error", function () {
      state.textContent = "Live updates paused; reconnecting…";
      if (source.readyState === EventSource.CLOSED) { setTimeout(connect, 5000); }
    });
  }

  document.addEventListener("error", function (e) {  // an overlay still being written: fetch it again shortly
    var image = e.target;
    if (image.tagName !== "IMG" || !(Number(image.dataset.retry) > 0)) { return; }
    image.dataset.retry = String(Number(image.dataset.retry) - 1);
    setTimeout(function () { image.src = image.src.split("?")[0] + "?retry=" + image.dataset.retry; }, 1500);
  }, true);
  document.body.addEventListener("htmx:responseError", function (e) {
    if (e.detail.xhr.status === 401) { window.location.reload(); }  // the session ended: the sign-in form
  });
  setInterval(function () {  // ages move on without a change
    var now = Date.now();
    live.querySelectorAll("time[data-age]").forEach(function (t) {
      var s = Math.max(0, Math.floor((now - Date.parse(t.getAttribute("datetime"))) / 1000));
      t.textContent = (s < 60 ? s + " s" : s < 3600 ? Math.floor(s / 60) + " min" : s < 86400 ?
        Math.floor(s / 3600) + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + " min" :
        Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h") + " ago";
    });
  }, 15000);
  connect();
}());
