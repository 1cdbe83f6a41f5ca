// placeholder: the miners view
"use strict";
registerView("miners", "miners-pane", () => {});
