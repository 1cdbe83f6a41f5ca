// placeholder: the account view
"use strict";
registerView("account", "account-pane", () => {});
