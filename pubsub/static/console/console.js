// The pubsub console's only script: the overview's counts refresh themselves (the block marked
// data-refresh is fetched again and swapped in, so forms keep what is typed), and forms marked
// data-confirm ask first. Everything works without it but the refresh.
"use strict";
function refreshEvery(seconds) {
  setInterval(async () => {
    const response = await fetch(location.href, { credentials: "same-origin" });
    if (!response.ok) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.querySelector("[data-refresh]");
    const current = document.querySelector("[data-refresh]");
    if (fresh && current) current.replaceWith(fresh);
  }, seconds * 1000);
}
document.addEventListener("DOMContentLoaded", () => {
  const live = document.querySelector("[data-refresh]");
  if (live) refreshEvery(Number(live.dataset.refresh));
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
});
