// Passes documents whose `type` equals the `type` query parameter.
function (doc, req) {
  return typeof doc.type === "string" && doc.type === req.query.type;
}
