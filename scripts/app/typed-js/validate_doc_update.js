// The `typed` example validator in JavaScript, as a CouchDB app writes it (the same rules as
// ../typed/validate_doc_update.lua and plugins/typed in Rust/WASM).
function (newDoc, oldDoc, userCtx, secObj) {
  if (oldDoc && oldDoc.locked === true) {
    throw ({forbidden: "this document is locked"});
  }
  if (newDoc._deleted || newDoc._id.indexOf("_design/") === 0) {
    return;
  }
  if (typeof newDoc.type !== "string") {
    throw ({forbidden: "documents need a string `type`"});
  }
  if (newDoc.type === "invoice" && !(typeof newDoc.amount === "number" && newDoc.amount >= 0)) {
    throw ({forbidden: "invoices need a non-negative `amount`"});
  }
  if (newDoc.type === "config") {
    if ((userCtx.roles || []).indexOf("_admin") !== -1) return;
    var admins = (secObj.admins || {}).names || [];
    if (admins.indexOf(userCtx.name) !== -1) return;
    log("refused config write by " + userCtx.name);
    throw ({unauthorized: "only admins may write config documents"});
  }
}
