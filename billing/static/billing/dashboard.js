// Draws every <canvas data-chart="ID"> from the JSON configuration in <script id="ID">
// (billing/charts.py builds them). Chart.js is the project's own static copy (vendor/chartjs).
(function () {
  "use strict";
  const charts = [];
  const number = new Intl.NumberFormat();
  for (const canvas of document.querySelectorAll("canvas[data-chart]")) {
    const source = document.getElementById(canvas.dataset.chart);
    if (!source) {
      throw new Error(`no chart data for ${canvas.id}`);
    }
    const config = JSON.parse(source.textContent);
    // Value axes (y, y2) get thousands separators; the x axis keeps its period labels.
    for (const [name, axis] of Object.entries(config.options.scales || {})) {
      if (name.startsWith("y")) {
        axis.ticks = Object.assign({callback: (value) => number.format(value)}, axis.ticks);
      }
    }
    charts.push(new Chart(canvas, config));
  }
  // The browser tests read what was drawn from here.
  window.gatewayCharts = charts;
})();
