// Run table view: one anywidget, rows arrive as JSON, sort and selection go back as traits.
function render({ model, el }) {
  el.classList.add("mantik-runtable");
  const wrap = document.createElement("div");
  wrap.className = "mantik-runtable-scroll";
  const table = document.createElement("table");
  table.setAttribute("role", "grid");
  wrap.appendChild(table);
  const note = document.createElement("div");
  note.className = "mantik-runtable-note";
  el.appendChild(wrap);
  el.appendChild(note);

  function draw() {
    const columns = model.get("columns") || [];
    const rows = model.get("rows") || [];
    const selected = new Set(model.get("selected") || []);
    const sortKey = model.get("sort_key");
    const desc = model.get("sort_desc");
    table.replaceChildren();
    const head = table.createTHead().insertRow();
    for (const col of columns) {
      const th = document.createElement("th");
      th.textContent = col.label;
      th.dataset.key = col.key;
      if (col.key === sortKey) {
        th.textContent += desc ? " \u25BC" : " \u25B2";
        th.setAttribute("aria-sort", desc ? "descending" : "ascending");
      }
      th.title = "Sort by " + col.label;
      th.addEventListener("click", () => {
        if (model.get("sort_key") === col.key) {
          model.set("sort_desc", !model.get("sort_desc"));
        } else {
          model.set("sort_key", col.key);
          model.set("sort_desc", col.key === "start" || col.key.startsWith("metrics."));
        }
        model.save_changes();
      });
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const row of rows) {
      const tr = body.insertRow();
      tr.dataset.runId = row.run_id;
      tr.className = "mantik-w-row" + (selected.has(row.run_id) ? " mantik-w-selected" : "");
      tr.setAttribute("aria-selected", selected.has(row.run_id) ? "true" : "false");
      for (const col of columns) {
        const td = tr.insertCell();
        const value = row.cells[col.key];
        td.textContent = value === null || value === undefined ? "" : String(value);
        if (col.key === "state") {
          td.className = "mantik-w-state mantik-w-state-" + String(row.state || "").toLowerCase();
        }
        if (col.numeric) td.className += " mantik-num";
      }
      tr.addEventListener("click", (event) => {
        let next;
        if (event.ctrlKey || event.metaKey || event.shiftKey) {
          const now = new Set(model.get("selected") || []);
          if (now.has(row.run_id)) now.delete(row.run_id);
          else now.add(row.run_id);
          next = [...now];
        } else {
          next = [row.run_id];
        }
        model.set("selected", next);
        model.save_changes();
      });
    }
    note.textContent = model.get("message") || "";
  }
  for (const name of ["columns", "rows", "selected", "sort_key", "sort_desc", "message"]) {
    model.on("change:" + name, draw);
  }
  draw();
}
export default { render };
