// Package apidef mirrors Tyk's apidef package: the definition of the API a request is for.
package apidef

// ProxyConfig is where the API listens and where it sends requests.
type ProxyConfig struct {
	ListenPath      string `json:"listen_path"`
	TargetURL       string `json:"target_url"`
	StripListenPath bool   `json:"strip_listen_path"`
}

// APIDefinition is the API a request is for, as a Tyk Classic definition names its parts.
type APIDefinition struct {
	// APIID is the ApiDefinition's namespace/name.
	APIID string `json:"api_id"`
	// Name is spec.name, else the resource's name.
	Name   string      `json:"name"`
	Slug   string      `json:"slug"`
	OrgID  string      `json:"org_id"`
	Active bool        `json:"active"`
	Proxy  ProxyConfig `json:"proxy"`
	// ConfigData is spec.configData.
	ConfigData map[string]interface{} `json:"config_data"`
	Tags       []string               `json:"tags"`
	// Spec is the whole ApiDefinition spec as JSON, for what the fields above leave out.
	Spec []byte `json:"-"`
}
