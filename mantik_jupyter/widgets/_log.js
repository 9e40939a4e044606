// Log view: a <pre> that follows the end of the log unless the user scrolled up.
function render({ model, el }) {
  const pre = document.createElement("pre");
  pre.className = "mantik-w-log";
  const status = document.createElement("div");
  status.className = "mantik-w-log-status";
  el.appendChild(pre);
  el.appendChild(status);
  function draw() {
    const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    pre.textContent = model.get("text") || "";
    status.textContent = model.get("status") || "";
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
  model.on("change:text", draw);
  model.on("change:status", draw);
  draw();
}
export default { render };
