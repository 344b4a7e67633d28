// The console's progressive enhancement; every page works without it.
"use strict";

// Forms that destroy something ask first.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});

// The upload form: a dropped file lands in the file input, and names the
// function when no name was typed.
function nameFromFile(input) {
  const name = document.getElementById("name");
  const file = input.files && input.files[0];
  if (name && file && !name.value) {
    name.value = file.name.replace(/\.wasm$/, "").toLowerCase().replace(/[^a-z0-9-]/g, "-");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("component");
  const zone = input && input.closest(".drop");
  if (zone) {
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        nameFromFile(input);
      }
    });
    input.addEventListener("change", () => nameFromFile(input));
  }

  // The live feed of a function's page: new invocations arrive as table
  // rows (Server-Sent Events) and go on top of the list when they pass
  // its outcome filter.
  const live = document.getElementById("live-status");
  if (live && live.dataset.live && window.EventSource) {
    const feed = new EventSource(live.dataset.live);
    feed.addEventListener("open", () => {
      live.textContent = "Live: new invocations appear as they finish.";
      live.dataset.connected = "true";
    });
    feed.addEventListener("invocation", (event) => {
      const rows = document.getElementById("invocation-rows");
      if (!rows) return;
      const holder = document.createElement("tbody");
      holder.innerHTML = event.data;
      const row = holder.firstElementChild;
      if (!row || rows.querySelector(`tr[data-id="${row.dataset.id}"]`)) return;
      const filter = rows.dataset.filter;
      const outcome = row.querySelector(".outcome");
      const code = outcome ? outcome.textContent : "";
      const status = Number(row.children[2] ? row.children[2].textContent : 0);
      const failed = code !== "ok" || status >= 500;
      if (filter && !(filter === code || (filter === "failed" && failed))) return;
      row.classList.add("new");
      rows.prepend(row);
    });
    feed.addEventListener("gone", () => { feed.close(); live.textContent = "Live feed ended."; });
    feed.addEventListener("error", () => { live.textContent = "Live: reconnecting…"; });
  }
});
