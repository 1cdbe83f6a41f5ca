// placeholder: the explorer view
"use strict";
registerView("explorer", "explorer-pane", () => {});
