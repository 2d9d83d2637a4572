// Package oas stands for Tyk's apidef/oas package. Gatehouse APIs are not Tyk OAS
// definitions, so ctx.GetOASDefinition returns nil, as Tyk does for Classic APIs.
package oas

// Info is an OpenAPI document's info object.
type Info struct {
	Title   string `json:"title"`
	Version string `json:"version"`
}

// OAS is a Tyk OAS API definition.
type OAS struct {
	OpenAPI string `json:"openapi"`
	Info    *Info  `json:"info"`
}
