-- Passes documents whose `type` equals the `type` query parameter.
function(doc, req)
  return type(doc.type) == "string" and doc.type == req.query.type
end
