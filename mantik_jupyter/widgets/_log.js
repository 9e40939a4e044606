// Log view: a <pre> that follows the end of the log unless the user scrolled up.

// Once per model (not per view): the kernel sends only what is new, and this keeps the
// model's text (what every view shows, and what a saved notebook keeps) up to date.
function initialize({ model }) {
  model.on("msg:custom", (msg) => {
    if (!msg || msg.type !== "append") return;
    const end = model.get("end") || 0;
    if (msg.end <= end) return; // already in the state this model got
    if (msg.after !== end) {
      // Not the text this append continues: ask for the whole state again.
      model.send({ type: "resync" });
      return;
    }
    const text = model.get("text") || "";
    // Local only (no save_changes): the kernel has this text already.
    model.set("end", msg.end);
    model.set("text", text.slice(msg.drop) + msg.text);
  });
}

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
export default { initialize, render };
